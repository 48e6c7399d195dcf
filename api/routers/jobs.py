"""``/jobs``: validate, then hand to :mod:`textcls.lifecycle` (submit, cancel); list, read,
reports."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import ValidationError
from sqlmodel import Session, select

from api.deps import (
    FilterId,
    NameFilter,
    Offset,
    PathId,
    SessionDep,
    SettingsDep,
    WriteAccess,
    get_or_404,
    newest_first,
    where_given,
)
from api.report_html import render_report
from textcls import lifecycle
from textcls.jobs import (
    DATASET_FIELDS,
    DATASET_LIST_FIELDS,
    KIND_PARAMS,
    MODEL_FIELDS,
    parse_params,
    queue_for,
)
from textcls.labels import job_label_problems
from textcls.models import FINAL_STATUSES, Dataset, Job, JobCreate, JobPublic, JobStatus, Model
from textcls.report import pipeline_report
from textcls.store import ArtifactStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


def _unprocessable(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)


def validate_job(session: Session, body: JobCreate) -> tuple[dict[str, Any], str]:
    """Check kind, params and referenced ids; returns (normalised params, queue)."""
    if body.kind not in KIND_PARAMS:
        raise _unprocessable(
            [
                {
                    "loc": ["body", "kind"],
                    "msg": f"unknown job kind {body.kind!r}; known: {sorted(KIND_PARAMS)}",
                    "type": "value_error",
                }
            ]
        )
    try:
        params = parse_params(body.kind, body.params)
    except ValidationError as exc:
        raise _unprocessable(
            [
                {"loc": ["body", "params", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_context=False)
            ]
        ) from None
    references = [(f, Dataset, "dataset") for f in (*DATASET_FIELDS, *DATASET_LIST_FIELDS)] + [
        (f, Model, "model") for f in MODEL_FIELDS
    ]
    errors = [
        {
            "loc": ["body", "params", name],
            "msg": f"{what} {value} does not exist",
            "type": "not_found",
        }
        for name, table, what in references
        for value in _ids(getattr(params, name, None))
        if session.get(table, value) is None
    ]
    if errors:
        raise _unprocessable(errors)
    label_errors = [
        {"loc": ["body", "params", name], "msg": msg, "type": "label_set"}
        for name, msg in job_label_problems(session, body.kind, params).items()
    ]
    if label_errors:
        raise _unprocessable(label_errors)
    return params.model_dump(mode="json", exclude_unset=True), queue_for(body.kind, params)


def _ids(value: int | list[int] | None) -> list[int]:
    """A reference parameter's ids: none, one, or a list's."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic, dependencies=[WriteAccess]
)
def create_job(session: SessionDep, body: JobCreate) -> Job:
    params, queue = validate_job(session, body)
    try:
        return lifecycle.submit(session, body.kind, params, queue)
    except lifecycle.QueueUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"job queue unavailable: {exc}"
        ) from None


@router.get("", response_model=list[JobPublic])
def list_jobs(
    session: SessionDep,
    # Named apart from the imported ``status`` module; clients send ?status=.
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: NameFilter = None,
    parent_id: FilterId = None,
    limit: int = 100,
    offset: Offset = 0,
) -> list[Job]:
    stmt = where_given(
        select(Job), (Job.status, status_filter), (Job.kind, kind), (Job.parent_id, parent_id)
    )
    return list(session.exec(newest_first(stmt, Job.id, limit, offset)))


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, job_id: PathId) -> Job:
    return get_or_404(session, Job, job_id, "job")


@router.post("/{job_id}/cancel", response_model=JobPublic, dependencies=[WriteAccess])
def cancel_job(session: SessionDep, job_id: PathId) -> Job:
    job = get_job(session, job_id)
    if job.status in FINAL_STATUSES:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job_id} is already {job.status}"
        )
    session.rollback()  # the lifecycle writes in its own transactions
    lifecycle.cancel(job_id)
    session.refresh(job)
    return job


def _pipeline_or_404(session: Session, job_id: int) -> Job:
    job = get_job(session, job_id)
    if job.kind != "pipeline":
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id} is a {job.kind} job, not a pipeline"
        )
    return job


@router.get("/{job_id}/report")
def get_report(session: SessionDep, job_id: PathId) -> dict[str, Any]:
    """A pipeline's comparison of every variant (JSON)."""
    job = _pipeline_or_404(session, job_id)
    return pipeline_report(session, job)


@router.get("/{job_id}/report.html", response_class=HTMLResponse)
def get_report_html(session: SessionDep, job_id: PathId) -> HTMLResponse:
    """The same comparison as a self-contained page with an accuracy/latency chart."""
    job = _pipeline_or_404(session, job_id)
    return HTMLResponse(render_report(pipeline_report(session, job), str(job.status)))


TSV_MEDIA_TYPE = "text/tab-separated-values; charset=utf-8"


@router.get(
    "/{job_id}/predictions",
    response_class=FileResponse,
    responses={
        200: {
            "content": {TSV_MEDIA_TYPE: {}},
            "description": "index<TAB>sentence<TAB>category<TAB>label<TAB>probability",
        },
        404: {"description": "no such job, not a predict job, or its output is gone"},
        409: {"description": "the job has not succeeded (yet)"},
    },
)
def get_predictions(session: SessionDep, settings: SettingsDep, job_id: PathId) -> FileResponse:
    """A ``predict`` job's output TSV, streamed from the artifact store in chunks."""
    job = get_job(session, job_id)
    if job.kind != "predict":
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job_id} is a {job.kind} job; only predict jobs have predictions",
        )
    if job.status != JobStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id} is {job.status}; its predictions exist once it has succeeded",
        )
    store = ArtifactStore.from_settings(settings)
    path = store.resolve(store.predictions_relpath(job_id))
    if not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id}'s predictions file is gone"
        )
    return FileResponse(path, media_type=TSV_MEDIA_TYPE, filename=f"predictions-{job_id}.tsv")
