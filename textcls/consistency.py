"""Does the database agree with the artifact folder?

:func:`check_consistency` lists every disagreement: a dataset or model row
whose file or folder is missing, a model folder that is empty or whose size
differs from the row, a model registered by a job that did not succeed, a
succeeded job naming a model that does not exist, anything under
``models/``, ``datasets/``, ``logs/`` or ``predictions/`` that no row names (an orphan: a
half-written or abandoned artifact), a training checkpoint under
``checkpoints/`` whose job is finished or gone (:func:`stale_checkpoints`),
whatever an interrupted deletion left in ``trash/``
(:func:`trashed_artifacts`), and staging entries under ``tmp/`` older than
``tmp_max_age`` seconds that no unfinished job owns (:func:`stale_staging`:
left by a killed worker; fresh ones are work in progress). ``textcls check``
runs it; ``textcls gc`` (:func:`textcls.retention.collect_garbage`) removes
the leftovers.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from textcls.models import FINAL_STATUSES, Dataset, Job, JobStatus, Model
from textcls.store import CHECKPOINTS, TMP, TRASH, ArtifactStore, dir_size

log = logging.getLogger(__name__)

# Top-level folders of the store whose entries must each belong to a row.
CHECKED_FOLDERS = ("datasets", "models", "logs", "predictions")
# A staging entry this old that no unfinished job owns was left by a killed worker.
STALE_TMP_SECONDS = 3600.0
# workers.runner names a job's staging folder tmp/job-<id>-<uuid>.
_JOB_STAGING_RE = re.compile(r"^job-(\d+)-")


def check_consistency(
    session: Session, store: ArtifactStore, *, tmp_max_age: float = STALE_TMP_SECONDS
) -> list[str]:
    """Every problem found, as readable sentences; an empty list means consistent."""
    problems: list[str] = []

    for ds in session.exec(select(Dataset).order_by(col(Dataset.id))):
        try:
            path = store.resolve(ds.path)
        except ValueError as exc:
            problems.append(f"dataset {ds.id}: {exc}")
            continue
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

    for entry in orphans(session, store):
        kind = "folder" if entry.is_dir() else "file"
        rel = f"{entry.parent.name}/{entry.name}"
        problems.append(f"orphan {kind} {rel!r}: no database row names it")
    for rel in stale_checkpoints(session, store):
        problems.append(f"stale checkpoint {rel!r}: its job is finished or gone (gc removes it)")
    problems.extend(_leftover_problems(session, store, tmp_max_age))
    for problem in problems:
        log.info("inconsistent: %s", problem)
    return problems


def stale_checkpoints(session: Session, store: ArtifactStore) -> list[str]:
    """Store paths of training checkpoints nothing will resume: their job ended or is gone.

    A job's checkpoint is removed when it ends; one is left behind only when
    that removal failed or ran on a host without the store. A queued or
    running job's checkpoint is in use (a requeued job resumes from it).
    """
    base = store.root / CHECKPOINTS
    if not base.is_dir():
        return []
    entries = sorted(base.iterdir(), key=lambda p: p.name)
    ids = {int(e.name) for e in entries if e.name.isdigit()}
    live = set(
        session.exec(
            select(Job.id).where(col(Job.id).in_(ids)).where(col(Job.status).not_in(FINAL_STATUSES))
        )
    )
    return [
        f"{CHECKPOINTS}/{e.name}" for e in entries if not (e.name.isdigit() and int(e.name) in live)
    ]


# --------------------------------------------------------------------------- leftovers


def age_seconds(path: Path) -> float:
    """Seconds since ``path`` (a file or folder) last changed; 0 if it is gone."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return 0.0


def stale_staging(session: Session, store: ArtifactStore, max_age: float) -> list[Path]:
    """``tmp/`` entries older than ``max_age`` seconds that no queued or running job owns."""
    entries = [e for e in store.entries(TMP) if age_seconds(e) >= max_age]
    owners = {int(m.group(1)) for e in entries if (m := _JOB_STAGING_RE.match(e.name))}
    unfinished: set[int | None] = set()
    if owners:
        stmt = select(Job.id).where(col(Job.id).in_(owners))
        unfinished = set(session.exec(stmt.where(col(Job.status).not_in(FINAL_STATUSES))))
    return [
        e
        for e in entries
        if not ((m := _JOB_STAGING_RE.match(e.name)) and int(m.group(1)) in unfinished)
    ]


@dataclass(frozen=True)
class Trashed:
    """One artifact an interrupted deletion left in ``trash/<uuid>/``."""

    folder: Path
    relpath: str
    # A row still names it and its place is empty: the deletion never committed.
    restorable: bool


def trashed_artifacts(session: Session, store: ArtifactStore) -> list[Trashed]:
    """What interrupted deletions left in ``trash/`` (a finished one leaves nothing)."""
    named = named_paths(session, store)
    return [
        Trashed(folder, rel, rel in named and not store.resolve(rel).exists())
        for folder in store.entries(TRASH)
        for rel in store.trashed(folder)
    ]


def named_paths(session: Session, store: ArtifactStore) -> set[str]:
    """Every relative path a row names: dataset files, model folders, job logs and
    a ``predict`` job's TSV."""
    paths = set(session.exec(select(Dataset.path)))
    paths.update(session.exec(select(Model.path)))
    for job_id in session.exec(select(Job.id)):
        if job_id is not None:
            paths.update((store.log_relpath(job_id), store.predictions_relpath(job_id)))
    return paths


def orphans(session: Session, store: ArtifactStore) -> list[Path]:
    """Entries under :data:`CHECKED_FOLDERS` that no row names."""
    named = named_paths(session, store)
    return [
        entry
        for folder in CHECKED_FOLDERS
        for entry in store.entries(folder)
        if f"{folder}/{entry.name}" not in named
    ]


def _leftover_problems(session: Session, store: ArtifactStore, tmp_max_age: float) -> list[str]:
    """Interrupted deletions in ``trash/`` and stale staging entries in ``tmp/``."""
    problems = []
    for item in trashed_artifacts(session, store):
        where = f"{TRASH}/{item.folder.name}/{item.relpath}"
        fate = (
            "its row still exists, so `textcls gc` puts it back"
            if item.restorable
            else "no row names it, so `textcls gc` removes it"
        )
        problems.append(f"interrupted deletion: {where!r} was moved aside; {fate}")
    for entry in stale_staging(session, store, tmp_max_age):
        problems.append(
            f"stale staging {'folder' if entry.is_dir() else 'file'} '{TMP}/{entry.name}': "
            f"{age_seconds(entry) / 3600:.1f} h old and no queued or running job owns it "
            "(left by a killed worker; `textcls gc` removes it)"
        )
    return problems
