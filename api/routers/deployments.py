"""Promotions, rollbacks and the deployment history.

A promotion or rollback is a row in ``deployments`` (the newest row names the
served model) plus a Redis pub/sub nudge so inference workers switch at once.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Response, status
from sqlmodel import Session, select

from api.deps import Offset, PathId, SessionDep, WriteAccess, newest_first
from api.routers.models import get_model_or_404
from pipeline.preprocess import META_FILE
from textcls.deployments import (
    SERVABLE_FORMATS,
    active_promotions,
    current_deployment,
    lock_deployments,
    publish_deployment,
)
from textcls.models import Deployment, DeploymentPublic, Model, utcnow
from textcls.store import ArtifactStore

log = logging.getLogger(__name__)
router = APIRouter(tags=["deployments"])


class DeploymentView(DeploymentPublic):
    """A deployment row with the model it serves."""

    model_name: str | None = None
    model_format: str | None = None
    num_labels: int | None = None
    current: bool = False


class DeploymentChange(DeploymentView):
    """The answer to a promotion or rollback."""

    previous_model_id: int | None = None
    notified_workers: int | None = None  # None: Redis unreachable, workers switch on their poll


def _view(session: Session, dep: Deployment, current_id: int | None) -> DeploymentView:
    model = session.get(Model, dep.model_id)
    return DeploymentView(
        **DeploymentPublic.model_validate(dep).model_dump(),
        model_name=model.name if model else None,
        model_format=model.format if model else None,
        num_labels=model.num_labels if model else None,
        current=dep.id == current_id,
    )


def servability_problem(model: Model) -> str | None:
    """Why inference workers could not load this model, or None if they can."""
    if model.format not in SERVABLE_FORMATS:
        return (
            f"model {model.id} has format {model.format!r}, which inference workers cannot "
            f"serve (servable: {', '.join(sorted(SERVABLE_FORMATS))})"
        )
    try:
        folder = ArtifactStore().resolve(model.path)
    except ValueError as exc:
        return f"model {model.id} is not servable: {exc}"
    if not folder.is_dir():
        return f"model {model.id} is not servable: its folder {model.path!r} is missing"
    if not (folder / META_FILE).is_file():
        return f"model {model.id} is not servable: its folder {model.path!r} has no {META_FILE}"
    return None


def _change(session: Session, dep: Deployment, previous_model_id: int | None) -> DeploymentChange:
    notified = publish_deployment(dep)
    view = _view(session, dep, dep.id)
    return DeploymentChange(
        **view.model_dump(), previous_model_id=previous_model_id, notified_workers=notified
    )


@router.post(
    "/models/{model_id}/promote",
    response_model=DeploymentChange,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
    tags=["models"],
    responses={
        200: {"description": "the model was already served; nothing recorded"},
        404: {"description": "unknown model"},
        409: {"description": "not servable, or a different label set without force"},
    },
)
def promote(
    session: SessionDep, model_id: PathId, response: Response, force: bool = False
) -> DeploymentChange:
    """Make a model the served one; every inference worker switches to it.

    A model whose number of labels differs from the served model's is refused
    unless ``force=true``: clients would silently get a different class set.
    """
    lock_deployments(session)
    model = get_model_or_404(session, model_id)
    problem = servability_problem(model)
    if problem:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=problem)
    current = current_deployment(session)
    if current is not None and current.model_id == model_id:
        # Promoting the served model again records nothing, so a later rollback
        # still goes back to the model before it (the nudge is resent anyway).
        session.rollback()
        response.status_code = status.HTTP_200_OK
        return _change(session, current, current.model_id)
    if current is not None and not force:
        served = session.get(Model, current.model_id)
        if served is not None and served.num_labels != model.num_labels:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=(
                    f"model {model_id} has {model.num_labels} labels but the served model "
                    f"{served.id} has {served.num_labels}; clients would get a different label "
                    "set. Promote with ?force=true to do it anyway."
                ),
            )
    dep = Deployment(model_id=model_id, action="promote", created_at=utcnow())
    session.add(dep)
    session.commit()
    session.refresh(dep)
    log.info("promoted model %s (deployment %s)", model_id, dep.id)
    return _change(session, dep, current.model_id if current else None)


@router.get("/deployments", response_model=list[DeploymentView])
def list_deployments(
    session: SessionDep, limit: int = 100, offset: Offset = 0
) -> list[DeploymentView]:
    """Promotions and rollbacks, newest first."""
    current = current_deployment(session)
    current_id = current.id if current else None
    stmt = newest_first(select(Deployment), Deployment.id, limit, offset)
    return [_view(session, d, current_id) for d in session.exec(stmt)]


@router.get(
    "/deployments/current",
    response_model=DeploymentView,
    responses={404: {"description": "nothing promoted yet"}},
)
def get_current(session: SessionDep) -> DeploymentView:
    """The deployment that names the served model."""
    current = current_deployment(session)
    if current is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail="no model has been promoted yet (POST /models/{id}/promote)",
        )
    return _view(session, current, current.id)


@router.post(
    "/deployments/rollback",
    response_model=DeploymentChange,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
    responses={409: {"description": "nothing to roll back to"}},
)
def rollback(session: SessionDep) -> DeploymentChange:
    """Serve the model promoted before the current one.

    The current promotion is marked reverted, so the next rollback goes one
    step further back instead of bouncing between two models.
    """
    lock_deployments(session)
    stack = active_promotions(session)
    if not stack:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="nothing to roll back: no model has been promoted"
        )
    if len(stack) < 2:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=(
                f"nothing to roll back to: model {stack[0].model_id} is the only promotion "
                "left in the history"
            ),
        )
    undone, target = stack[0], stack[1]
    model = session.get(Model, target.model_id)
    problem = servability_problem(model) if model is not None else "the model row is gone"
    if problem:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"cannot roll back to model {target.model_id}: {problem}",
        )
    undone.reverted = True
    session.add(undone)
    dep = Deployment(model_id=target.model_id, action="rollback", created_at=utcnow())
    session.add(dep)
    session.commit()
    session.refresh(dep)
    log.info("rolled back from model %s to model %s", undone.model_id, target.model_id)
    return _change(session, dep, undone.model_id)
