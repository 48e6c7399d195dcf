"""Adding a dataset or model: its row and its artifact appear together.

Both functions work inside the caller's transaction: the row gets its id from
a flush, the staged artifact is moved to the path built from that id, and the
caller commits (removing the path again if the commit fails). Used by the
upload route, the job runner, and the benchmarks and tests that set up state
without the API.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlmodel import Session

from textcls.models import Dataset, Model
from textcls.store import ArtifactStore, dir_size


def add_dataset(
    session: Session,
    store: ArtifactStore,
    raw: bytes,
    *,
    name: str,
    rows: int,
    num_labels: int,
    label_counts: dict[str, int],
    label_names: list[str] | None = None,
    labelled: bool = True,
    stored: bytes | None = None,
) -> Dataset:
    """A ``datasets`` row for already validated TSV bytes, the file written into the store.

    ``stored``: the bytes to keep, where they differ from the upload ``raw``
    (a file of label names is kept with class ids); ``sha256`` is the upload's.
    """
    content = raw if stored is None else stored
    row = Dataset(
        name=name,
        rows=rows,
        num_labels=num_labels,
        label_counts=label_counts,
        label_names=label_names,
        labelled=labelled,
        sha256=hashlib.sha256(raw).hexdigest(),
        size_bytes=len(content),
        path="",
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    row.path = store.dataset_relpath(row.id)
    with store.staging() as tmp:
        staged = tmp / "data.tsv"
        staged.write_bytes(content)
        store.commit(staged, row.path)
    return row


def add_model(
    session: Session,
    store: ArtifactStore,
    staged: Path | None,
    *,
    name: str,
    format: str,
    num_labels: int,
    parent_id: int | None = None,
    job_id: int | None = None,
    info: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
) -> Model:
    """A ``models`` row, its staged folder moved into the store (``None``: a row only)."""
    row = Model(
        name=name[:200],
        format=format,
        parent_id=parent_id,
        job_id=job_id,
        size_bytes=dir_size(staged) if staged is not None else 0,
        num_labels=num_labels,
        label_names=label_names,
        info=info or {},
        path="",
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    row.path = store.model_relpath(row.id)
    if staged is not None:
        store.commit(staged, row.path)
    return row
