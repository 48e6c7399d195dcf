"""Does the database agree with the artifact folder?

:func:`check_consistency` lists every disagreement: a dataset or model row
whose file or folder is missing, a model folder that is empty or whose size
differs from the row, a model registered by a job that did not succeed, a
succeeded job naming a model that does not exist, and anything under
``models/`` or ``datasets/`` that no row names (an orphan: a half-written or
abandoned artifact). The ``tmp/`` staging area is not checked: work in progress
lives there. ``textcls check`` runs it.
"""

from __future__ import annotations

import logging

from sqlmodel import Session, col, select

from textcls.models import Dataset, Job, JobStatus, Model
from textcls.store import ArtifactStore, dir_size

log = logging.getLogger(__name__)

# Top-level folders of the store whose entries must each belong to a row.
CHECKED_FOLDERS = ("datasets", "models")


def check_consistency(session: Session, store: ArtifactStore) -> list[str]:
    """Every problem found, as readable sentences; an empty list means consistent."""
    problems: list[str] = []
    expected: set[str] = set()

    for ds in session.exec(select(Dataset).order_by(col(Dataset.id))):
        try:
            path = store.resolve(ds.path)
        except ValueError as exc:
            problems.append(f"dataset {ds.id}: {exc}")
            continue
        expected.add(ds.path)
        if not path.is_file():
            problems.append(f"dataset {ds.id}: file {ds.path!r} is missing")
        elif path.stat().st_size != ds.size_bytes:
            problems.append(
                f"dataset {ds.id}: file {ds.path!r} has {path.stat().st_size} bytes, "
                f"the row says {ds.size_bytes}"
            )

    jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.output_model_id).is_not(None)))}
    model_ids: set[int] = set()
    for model in session.exec(select(Model).order_by(col(Model.id))):
        assert model.id is not None
        model_ids.add(model.id)
        try:
            path = store.resolve(model.path)
        except ValueError as exc:
            problems.append(f"model {model.id}: {exc}")
            continue
        expected.add(model.path)
        if not path.is_dir():
            problems.append(f"model {model.id}: folder {model.path!r} is missing")
        elif not any(path.iterdir()):
            problems.append(f"model {model.id}: folder {model.path!r} is empty")
        elif dir_size(path) != model.size_bytes:
            problems.append(
                f"model {model.id}: folder {model.path!r} has {dir_size(path)} bytes, "
                f"the row says {model.size_bytes} (changed or half-written)"
            )
        if model.job_id is not None:
            job = jobs.get(model.job_id) or session.get(Job, model.job_id)
            if job is None:
                problems.append(f"model {model.id}: its job {model.job_id} does not exist")
            elif job.status != JobStatus.succeeded or job.output_model_id != model.id:
                problems.append(
                    f"model {model.id}: registered by job {job.id}, which is {job.status} "
                    f"with output model {job.output_model_id}"
                )

    for job in jobs.values():
        if job.output_model_id not in model_ids:
            problems.append(f"job {job.id}: output model {job.output_model_id} does not exist")

    for folder in CHECKED_FOLDERS:
        base = store.root / folder
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            rel = f"{folder}/{entry.name}"
            if rel not in expected:
                kind = "folder" if entry.is_dir() else "file"
                problems.append(f"orphan {kind} {rel!r}: no database row names it")
    for problem in problems:
        log.info("inconsistent: %s", problem)
    return problems
