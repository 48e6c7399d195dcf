"""``/datasets``: upload (validated) and read."""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from sqlmodel import select

from api.deps import (
    Offset,
    PathId,
    SessionDep,
    SettingsDep,
    WriteAccess,
    get_or_404,
    newest_first,
)
from pipeline.data import TSVError, canonical_tsv, parse_tsv
from textcls.models import Dataset, DatasetPublic
from textcls.records import add_dataset
from textcls.store import ArtifactStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/datasets", tags=["datasets"])

_NAME_RE = re.compile(r"^[\w .()\-]{1,200}$")


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    """Read the upload, refusing as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                detail=f"file is over the size limit of {limit} bytes",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_label_names(value: str | None) -> list[str] | None:
    """The ``label_names`` form field: a JSON list of strings (checked further by the parser)."""
    if value is None:
        return None
    try:
        names = json.loads(value)
    except ValueError:
        names = None
    if not isinstance(names, list):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail='label_names must be a JSON list of names like ["neg", "pos"], '
            f"got {value[:80]!r}",
        )
    return names


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    dependencies=[WriteAccess],
)
async def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(
            description="TSV: index<TAB>sentence<TAB>label (ids or names), or "
            "index<TAB>sentence for unlabelled text"
        ),
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
    label_names: Annotated[
        str | None,
        Form(
            description='JSON list naming the class ids in order, e.g. ["neg", "pos"]; '
            "for a file of names it fixes their ids (default: sorted by name)"
        ),
    ] = None,
) -> Dataset:
    """Upload a dataset. Names in the label column get ids in sorted order unless
    ``label_names`` gives the order; the stored file holds the ids."""
    data = await _read_limited(file, settings.max_upload_bytes)
    names = _parse_label_names(label_names)
    try:
        parsed = parse_tsv(data, max_bytes=settings.max_upload_bytes, label_names=names)
    except TSVError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    display = name if name is not None else (file.filename or "dataset")
    display = display.strip()
    if not _NAME_RE.match(display):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="name must be 1-200 letters, digits, spaces or . _ - ( )",
        )
    store = ArtifactStore.from_settings(settings)
    # The row and the file appear together or not at all.
    row = add_dataset(
        session,
        store,
        data,
        name=display,
        rows=len(parsed),
        num_labels=parsed.num_labels,
        label_counts=parsed.label_counts(),
        label_names=parsed.label_names,
        labelled=parsed.labelled,
        # A file of names is kept with class ids: every step reads ids.
        stored=canonical_tsv(parsed) if parsed.names_in_file else None,
    )
    try:
        session.commit()
    except Exception:
        store.remove(row.path)
        raise
    session.refresh(row)
    log.info("dataset %s stored: %d rows, labels %s", row.id, row.rows, row.label_counts)
    return row


@router.get("", response_model=list[DatasetPublic])
def list_datasets(session: SessionDep, limit: int = 100, offset: Offset = 0) -> list[Dataset]:
    return list(session.exec(newest_first(select(Dataset), Dataset.id, limit, offset)))


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(session: SessionDep, dataset_id: PathId) -> Dataset:
    return get_or_404(session, Dataset, dataset_id, "dataset")
