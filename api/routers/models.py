"""``/models``: registered models with their evaluations and lineage."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select

from api.deps import (
    FilterId,
    NameFilter,
    Offset,
    PathId,
    SessionDep,
    SettingsDep,
    get_or_404,
    newest_first,
    where_given,
)
from textcls.modelcard import CARD_NAME, archive_name, model_card, stream_tar_gz
from textcls.models import Evaluation, EvaluationPublic, Model, ModelPublic
from textcls.store import ArtifactStore

router = APIRouter(prefix="/models", tags=["models"])


def to_public(session: Session, model: Model) -> ModelPublic:
    evals = session.exec(select(Evaluation).where(Evaluation.model_id == model.id)).all()
    return ModelPublic.model_validate(
        {**model.model_dump(), "evaluations": [EvaluationPublic.model_validate(e) for e in evals]}
    )


def get_model_or_404(session: Session, model_id: int) -> Model:
    return get_or_404(session, Model, model_id, "model")


@router.get("", response_model=list[ModelPublic])
def list_models(
    session: SessionDep,
    format: NameFilter = None,
    parent_id: FilterId = None,
    job_id: FilterId = None,
    limit: int = 100,
    offset: Offset = 0,
) -> list[ModelPublic]:
    stmt = where_given(
        select(Model), (Model.format, format), (Model.parent_id, parent_id), (Model.job_id, job_id)
    )
    return [
        to_public(session, m) for m in session.exec(newest_first(stmt, Model.id, limit, offset))
    ]


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(session: SessionDep, model_id: PathId) -> ModelPublic:
    return to_public(session, get_model_or_404(session, model_id))


def lineage(session: Session, model: Model) -> list[Model]:
    """The model's ancestors (root first), the model, then its descendants (breadth first)."""
    chain: list[Model] = []
    seen: set[int] = set()
    cur: Model | None = model
    while cur is not None and cur.id not in seen:
        assert cur.id is not None
        seen.add(cur.id)
        chain.insert(0, cur)
        cur = session.get(Model, cur.parent_id) if cur.parent_id is not None else None
    frontier = [model.id]
    while frontier:
        children = session.exec(select(Model).where(col(Model.parent_id).in_(frontier))).all()
        frontier = []
        for child in sorted(children, key=lambda m: m.id or 0):
            if child.id not in seen:
                assert child.id is not None
                seen.add(child.id)
                chain.append(child)
                frontier.append(child.id)
    return chain


@router.get("/{model_id}/lineage", response_model=list[ModelPublic])
def get_lineage(session: SessionDep, model_id: PathId) -> list[ModelPublic]:
    """The comparison view: the whole lineage with every evaluation, side by side."""
    model = get_model_or_404(session, model_id)
    return [to_public(session, m) for m in lineage(session, model)]


@router.get(
    "/{model_id}/download",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/gzip": {}},
            "description": "model-<id>/: the model folder plus README.md, its model card",
        },
        404: {"description": "no such model, or its folder is missing"},
    },
)
def download_model(session: SessionDep, settings: SettingsDep, model_id: PathId) -> Response:
    """The model folder as a ``.tar.gz`` with a model card, streamed as it is written.

    The card names the lineage, parameters, evaluations and label names, and
    how to load the folder with plain transformers or onnxruntime.
    """
    model = get_model_or_404(session, model_id)
    store = ArtifactStore.from_settings(settings)
    folder = store.resolve(model.path)
    if not folder.is_dir():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"model {model_id}'s folder {model.path!r} is missing"
        )
    card = model_card(session, model, folder).encode("utf-8")
    name = archive_name(model)
    chunks = (c for c in stream_tar_gz(name, folder, {CARD_NAME: card}) if c)
    return StreamingResponse(
        chunks,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'},
    )
