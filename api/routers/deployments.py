"""Promotions, rollbacks and the deployment history: parse, call
:mod:`textcls.deployments` (which holds the rules), respond.

A promotion or rollback is a row in ``deployments`` (the newest row names the
served model) plus a Redis pub/sub nudge so inference workers switch at once.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Response, status
from sqlmodel import Session, select

from api.deps import Offset, PathId, SessionDep, WriteAccess, newest_first
from api.routers.models import get_model_or_404
from textcls import deployments
from textcls.deployments import current_deployment
from textcls.models import Deployment, DeploymentPublic, Model

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


def _changed(session: Session, change: deployments.Change) -> DeploymentChange:
    """Commit a recorded change, nudge the inference workers, and describe it."""
    if change.recorded:
        session.commit()
    else:
        session.rollback()  # nothing written: release the deployments lock
    dep = change.deployment
    session.refresh(dep)
    notified = deployments.publish_deployment(dep)
    view = _view(session, dep, dep.id)
    return DeploymentChange(
        **view.model_dump(), previous_model_id=change.previous_model_id, notified_workers=notified
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
    model = get_model_or_404(session, model_id)
    try:
        change = deployments.promote(session, model, force=force)
    except deployments.DeploymentRefused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    if not change.recorded:
        response.status_code = status.HTTP_200_OK
    return _changed(session, change)


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
    try:
        change = deployments.rollback(session)
    except deployments.DeploymentRefused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return _changed(session, change)
