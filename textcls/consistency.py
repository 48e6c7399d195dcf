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
left by a killed worker; fresh ones are work in progress). With an object
store the artifacts are read from it (a listing per folder, no download), and
an artifact without its manifest is incomplete: an upload that was killed,
reported as an orphan (no row can name it yet). ``textcls check``
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
from textcls.store import CHECKPOINTS, TMP, TRASH, ArtifactStore, Entry

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

    scans: dict[str, dict[str, Entry]] = {}
    for ds in session.exec(select(Dataset).order_by(col(Dataset.id))):
        entry = _named_entry(store, scans, ds.path, f"dataset {ds.id}", problems)
        if entry is None:
            continue
        if entry.is_dir or not entry.complete:
            problems.append(f"dataset {ds.id}: file {ds.path!r} is missing{_incomplete(entry)}")
        elif entry.size != ds.size_bytes:
            problems.append(
                f"dataset {ds.id}: file {ds.path!r} has {entry.size} bytes, "
                f"the row says {ds.size_bytes}"
            )

    jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.output_model_id).is_not(None)))}
    model_ids: set[int] = set()
    for model in session.exec(select(Model).order_by(col(Model.id))):
        assert model.id is not None
        model_ids.add(model.id)
        entry = _named_entry(store, scans, model.path, f"model {model.id}", problems, "folder")
        if entry is None:
            pass
        elif not entry.is_dir or not entry.complete:
            problems.append(
                f"model {model.id}: folder {model.path!r} is missing{_incomplete(entry)}"
            )
        elif entry.files == 0:
            problems.append(f"model {model.id}: folder {model.path!r} is empty")
        elif entry.size != model.size_bytes:
            problems.append(
                f"model {model.id}: folder {model.path!r} has {entry.size} bytes, "
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
        kind = "folder" if entry.is_dir else "file"
        problems.append(
            f"orphan {kind} {entry.relpath!r}: no database row names it{_incomplete(entry)}"
        )
    for rel in stale_checkpoints(session, store):
        problems.append(f"stale checkpoint {rel!r}: its job is finished or gone (gc removes it)")
    problems.extend(_leftover_problems(session, store, tmp_max_age))
    for problem in problems:
        log.info("inconsistent: %s", problem)
    return problems


def _named_entry(
    store: ArtifactStore,
    scans: dict[str, dict[str, Entry]],
    relpath: str,
    what: str,
    problems: list[str],
    kind: str = "file",
) -> Entry | None:
    """The entry a row's path names (folders scanned once); a problem when bad or missing."""
    try:
        rel = store.local_path(relpath).relative_to(store.root).as_posix()
    except ValueError as exc:
        problems.append(f"{what}: {exc}")
        return None
    folder, _, name = rel.partition("/")
    if folder not in scans:
        scans[folder] = store.scan(folder)
    entry = scans[folder].get(name)
    if entry is None:
        problems.append(f"{what}: {kind} {relpath!r} is missing")
    return entry


def _incomplete(entry: Entry) -> str:
    if entry.complete:
        return ""
    return " (an upload that did not finish: it has no manifest; `textcls gc` removes it)"


def stale_checkpoints(session: Session, store: ArtifactStore) -> list[str]:
    """Store paths of training checkpoints nothing will resume: their job ended or is gone.

    A job's checkpoint is removed when it ends; one is left behind only when
    that removal failed or ran on a host without the store. A queued or
    running job's checkpoint is in use (a requeued job resumes from it).
    """
    entries = sorted(store.scan(CHECKPOINTS).values(), key=lambda e: e.name)
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
        # With an object store the objects stay until the purge: a row naming
        # one is enough (its deletion never committed).
        Trashed(folder, rel, rel in named and (store.remote is not None or not store.exists(rel)))
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


def orphans(session: Session, store: ArtifactStore) -> list[Entry]:
    """Entries under :data:`CHECKED_FOLDERS` that no row names (with an object
    store: and uploads that never finished, whose name no row can have yet)."""
    named = named_paths(session, store)
    return [
        entry
        for folder in CHECKED_FOLDERS
        for entry in store.scan(folder).values()
        if entry.relpath not in named
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
