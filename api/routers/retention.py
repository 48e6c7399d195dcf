"""``DELETE /datasets/{id}``, ``/models/{id}``, ``/jobs/{id}``: parse, call
:mod:`textcls.retention` (which holds the rules), respond."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from api.deps import PathId, SessionDep, SettingsDep, WriteAccess
from textcls import retention
from textcls.retention import Removal
from textcls.settings import Settings
from textcls.store import ArtifactStore

router = APIRouter()

Cascade = Annotated[
    bool, Query(description="also delete every model derived from the ones deleted")
]


def _responses(what: str, in_use: str) -> dict[int | str, dict[str, Any]]:
    return {
        401: {"description": "missing or wrong API key (when TEXTCLS_API_KEY is set)"},
        404: {"description": f"unknown {what}"},
        409: {"description": f"refused, nothing changed: {in_use}; the detail says why"},
    }


def _store(settings: Settings) -> ArtifactStore:
    return ArtifactStore.from_settings(settings)


def _delete(fn: Callable[[], Removal]) -> Removal:
    try:
        return fn()
    except retention.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except retention.InUse as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None


@router.delete(
    "/datasets/{dataset_id}",
    response_model=Removal,
    dependencies=[WriteAccess],
    tags=["datasets"],
    responses=_responses("dataset", "a queued or running job reads it"),
)
def delete_dataset(session: SessionDep, settings: SettingsDep, dataset_id: PathId) -> Removal:
    """Delete a dataset, its file and the evaluations made on it."""
    return _delete(lambda: retention.delete_dataset(session, _store(settings), dataset_id))


@router.delete(
    "/models/{model_id}",
    response_model=Removal,
    dependencies=[WriteAccess],
    tags=["models"],
    responses=_responses(
        "model",
        "it is served, a rollback would return to it, an unfinished job or running "
        "pipeline uses it, or models derive from it (without cascade)",
    ),
)
def delete_model(
    session: SessionDep, settings: SettingsDep, model_id: PathId, cascade: Cascade = False
) -> Removal:
    """Delete a model, its folder and its evaluations; ``cascade=true`` takes its subtree.

    Jobs that made a deleted model keep their row; their ``output_model_id``
    is cleared (listed in ``jobs_updated``).
    """
    return _delete(
        lambda: retention.delete_model(session, _store(settings), model_id, cascade=cascade)
    )


@router.delete(
    "/jobs/{job_id}",
    response_model=Removal,
    dependencies=[WriteAccess],
    tags=["jobs"],
    responses=_responses(
        "job",
        "it (or a step) is not finished, it is one step of a pipeline, one of its models "
        "is in use, or other jobs' models derive from its models (without cascade)",
    ),
)
def delete_job(
    session: SessionDep, settings: SettingsDep, job_id: PathId, cascade: Cascade = False
) -> Removal:
    """Delete a finished job with its steps, logs and outputs (models, evaluations)."""
    return _delete(lambda: retention.delete_job(session, _store(settings), job_id, cascade=cascade))
