"""Deleting datasets, models and jobs, and collecting what is left over.

One set of rules for ``DELETE /datasets|models|jobs/{id}`` and ``textcls gc``.
A refusal is an :class:`InUse` whose message names the reason (the API's 409):

- the served model, and every model a rollback would return to (the
  promotions no rollback undid: :func:`textcls.deployments.active_promotions`);
- a dataset or model that a queued or running job reads (its ``dataset_id``,
  ``eval_dataset_id``, ``model_id`` or ``teacher_model_id``), and a model made
  by a step of a pipeline that is still running (its later steps read it);
- a model with descendants, unless ``cascade``, which deletes the subtree;
- a job that is not finished, or that is one step of a pipeline (its pipeline
  is deleted with all its steps).

What goes with a thing: a model's evaluations and the promotion history rows
that name it (none that a rollback would use: those are refused above); a
dataset's evaluations; a job's steps, logs, checkpoint and outputs (its models,
evaluations and a ``predict`` job's TSV). A job whose output model is deleted
keeps its row, with ``output_model_id`` cleared and its stage saying so.

Rows and files go together, as in :mod:`textcls.records`: the rows are deleted
and the files moved into ``trash/<uuid>/`` in one transaction; the trash folder
is removed after the commit, and its files are put back if the commit fails.
(With an object store the objects stay where they are until the commit, and
are deleted after it; the trash folder lists them.)
A crash in between leaves the trash folder, which ``textcls check`` reports
and :func:`collect_garbage` resolves: back in place while a row still names a
file, removed once none does.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from datetime import timedelta

from pydantic import BaseModel, Field
from sqlalchemy import delete
from sqlmodel import Session, col, select

from textcls import lifecycle
from textcls.consistency import (
    STALE_TMP_SECONDS,
    age_seconds,
    orphans,
    stale_checkpoints,
    stale_staging,
    trashed_artifacts,
)
from textcls.deployments import active_promotions, current_deployment, lock_deployments
from textcls.jobs import DATASET_FIELDS, DATASET_LIST_FIELDS, MODEL_FIELDS
from textcls.models import FINAL_STATUSES, Dataset, Deployment, Evaluation, Job, Model, utcnow
from textcls.pipelines import step_of
from textcls.store import TMP, TRASH, ArtifactStore

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """The thing to delete does not exist (the API's 404)."""


class InUse(Exception):
    """The thing to delete is in use; the message says by what (the API's 409)."""


class Removal(BaseModel):
    """What a deletion removed (or, in a dry run, would remove)."""

    datasets: list[int] = Field(default_factory=list)
    models: list[int] = Field(default_factory=list, description="children before parents")
    jobs: list[int] = Field(default_factory=list, description="steps before their pipeline")
    evaluations: list[int] = Field(default_factory=list)
    deployments: list[int] = Field(
        default_factory=list, description="history rows naming a deleted model"
    )
    jobs_updated: list[int] = Field(
        default_factory=list, description="jobs kept whose output model was deleted"
    )
    files: list[str] = Field(default_factory=list, description="artifact paths removed")


# --------------------------------------------------------------------------- what is in use


def _unfinished_jobs(session: Session) -> list[Job]:
    return list(session.exec(select(Job).where(col(Job.status).not_in(FINAL_STATUSES))))


def _readers(session: Session, fields: Iterable[str], ids: Collection[int]) -> dict[int, list[str]]:
    """For each of ``ids``: the queued or running jobs whose params name it in ``fields``."""
    found: dict[int, list[str]] = {}
    for job in _unfinished_jobs(session):
        for name in fields:
            value = (job.params or {}).get(name)
            # A list field (a pretrain job's ``dataset_ids``) names several records.
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, int) and item in ids:
                    found.setdefault(item, []).append(
                        f"job {job.id} ({job.kind}, {job.status}) reads it as {name}"
                    )
    return found


def protected_models(session: Session) -> dict[int, list[str]]:
    """Every model that must stay, with the reasons."""
    reasons: dict[int, list[str]] = {}
    current = current_deployment(session)
    if current is not None:
        reasons[current.model_id] = [f"it is the served model (deployment {current.id})"]
    for dep in active_promotions(session):
        reasons.setdefault(dep.model_id, []).append(
            f"a rollback would return to it (promotion {dep.id})"
        )
    all_ids = {m for m in session.exec(select(Model.id)) if m is not None}
    for model_id, why in _readers(session, MODEL_FIELDS, all_ids).items():
        reasons.setdefault(model_id, []).extend(why)
    running = [j.id for j in _unfinished_jobs(session) if j.kind == "pipeline"]
    if running:
        steps = {s.id: s for s in session.exec(select(Job).where(col(Job.parent_id).in_(running)))}
        stmt = select(Model).where(col(Model.job_id).in_(list(steps)))
        for model in session.exec(stmt):
            assert model.id is not None and model.job_id is not None
            step = steps[model.job_id]
            reasons.setdefault(model.id, []).append(
                f"it was made by step {step_of(step)} (job {step.id}) of pipeline job "
                f"{step.parent_id}, which is still running"
            )
    return reasons


def _refuse_protected(session: Session, what: str, model_ids: Iterable[int]) -> None:
    protected = protected_models(session)
    hits = [f"model {m}: {'; '.join(protected[m])}" for m in sorted(model_ids) if m in protected]
    if hits:
        raise InUse(f"cannot delete {what}: " + "; ".join(hits))


# --------------------------------------------------------------------------- lineage


def _subtree(session: Session, roots: Collection[int]) -> list[int]:
    """``roots`` and every model derived from them, parents before children."""
    order = list(dict.fromkeys(roots))
    seen = set(order)
    frontier = list(order)
    while frontier:
        stmt = select(Model.id).where(col(Model.parent_id).in_(frontier)).order_by(col(Model.id))
        frontier = [m for m in session.exec(stmt) if m is not None and m not in seen]
        seen.update(frontier)
        order.extend(frontier)
    return order


def _children_first(session: Session, model_ids: Collection[int]) -> list[int]:
    """``model_ids`` ordered so that no model comes before one derived from it."""
    rows = session.exec(select(Model.id, Model.parent_id).where(col(Model.id).in_(model_ids)))
    parent: dict[int, int | None] = {m: p for m, p in rows if m is not None}

    def depth(m: int) -> int:
        d, up = 0, parent[m]
        while up is not None and up in parent and d <= len(parent):
            d, up = d + 1, parent[up]
        return d

    return sorted(parent, key=lambda m: (-depth(m), -m))


def _job_tree(session: Session, job_id: int) -> list[Job]:
    """The job and its steps (a pipeline's children, any depth), parents first."""
    tree: list[Job] = []
    frontier = [job_id]
    while frontier:
        jobs = list(session.exec(select(Job).where(col(Job.id).in_(frontier))))
        tree.extend(jobs)
        stmt = select(Job.id).where(col(Job.parent_id).in_(frontier))
        frontier = [j for j in session.exec(stmt) if j is not None]
    return tree


# --------------------------------------------------------------------------- deleting


def delete_dataset(session: Session, store: ArtifactStore, dataset_id: int) -> Removal:
    """Delete a dataset, its file and the evaluations made on it; commits."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    readers = _readers(session, DATASET_FIELDS + DATASET_LIST_FIELDS, {dataset_id}).get(dataset_id)
    if readers:
        raise InUse(f"cannot delete dataset {dataset_id}: " + "; ".join(readers))
    evals = session.exec(select(Evaluation.id).where(Evaluation.dataset_id == dataset_id))
    removal = Removal(
        datasets=[dataset_id],
        evaluations=sorted(e for e in evals if e is not None),
        files=[dataset.path],
    )
    return _apply(session, store, removal)


def delete_model(
    session: Session, store: ArtifactStore, model_id: int, *, cascade: bool = False
) -> Removal:
    """Delete a model (with ``cascade``: and every model derived from it); commits."""
    lock_deployments(session)  # no promotion or rollback while the rules are checked
    if session.get(Model, model_id) is None:
        raise NotFound(f"model {model_id} not found")
    subtree = _subtree(session, [model_id])
    below = subtree[1:]
    if below and not cascade:
        raise InUse(
            f"cannot delete model {model_id}: models {_ids(below)} are derived from it "
            "(delete them first, or pass cascade=true to delete the whole subtree)"
        )
    _refuse_protected(session, f"model {model_id}", subtree)
    return _apply(session, store, _model_removal(session, subtree))


def delete_job(
    session: Session, store: ArtifactStore, job_id: int, *, cascade: bool = False
) -> Removal:
    """Delete a finished job with its steps, logs and outputs; commits.

    Its outputs are the models and evaluations it (or a step) made; models
    derived from those by other jobs go too only with ``cascade``.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.parent_id is not None:
        raise InUse(
            f"cannot delete job {job_id}: it is step {step_of(job)} of pipeline job "
            f"{job.parent_id}; delete the pipeline to delete its steps"
        )
    tree = _job_tree(session, job_id)
    unfinished = [j for j in tree if j.status not in FINAL_STATUSES]
    if unfinished:
        busy = ", ".join(f"job {j.id} is {j.status}" for j in unfinished)
        raise InUse(
            f"cannot delete job {job_id}: only finished jobs can be deleted, and {busy} "
            f"(cancel it first: POST /jobs/{job_id}/cancel)"
        )
    lock_deployments(session)
    ids = [j.id for j in tree if j.id is not None]
    stmt = select(Model.id).where(col(Model.job_id).in_(ids))
    made = [m for m in session.exec(stmt) if m is not None]
    subtree = _subtree(session, made)
    derived = [m for m in subtree if m not in made]
    if derived and not cascade:
        raise InUse(
            f"cannot delete job {job_id}: models {_ids(derived)} were derived from its models "
            f"{_ids(made)} by other jobs (delete them first, or pass cascade=true)"
        )
    _refuse_protected(session, f"job {job_id}", subtree)
    removal = _model_removal(session, subtree, keep_jobs=ids)
    evals = session.exec(select(Evaluation.id).where(col(Evaluation.job_id).in_(ids)))
    removal.evaluations = sorted({*removal.evaluations, *(e for e in evals if e is not None)})
    removal.jobs = ids[::-1]
    for i in ids:
        removal.files += [
            store.log_relpath(i),
            store.checkpoint_relpath(i),
            store.predictions_relpath(i),
        ]
    return _apply(session, store, removal)


def _model_removal(
    session: Session, model_ids: Collection[int], *, keep_jobs: Collection[int] = ()
) -> Removal:
    """What deleting these models takes with it (not yet applied)."""
    ids = list(model_ids)
    rows = session.exec(select(Model.path).where(col(Model.id).in_(ids)))
    evals = session.exec(select(Evaluation.id).where(col(Evaluation.model_id).in_(ids)))
    deps = session.exec(select(Deployment.id).where(col(Deployment.model_id).in_(ids)))
    jobs = session.exec(
        select(Job.id)
        .where(col(Job.output_model_id).in_(ids))
        .where(col(Job.id).not_in(list(keep_jobs)))
    )
    return Removal(
        models=_children_first(session, ids),
        evaluations=sorted(e for e in evals if e is not None),
        deployments=sorted(d for d in deps if d is not None),
        jobs_updated=sorted(j for j in jobs if j is not None),
        files=sorted(rows),
    )


def _apply(session: Session, store: ArtifactStore, removal: Removal) -> Removal:
    """Delete the rows, move the files aside, commit, then remove the files."""
    if removal.evaluations:
        session.exec(delete(Evaluation).where(col(Evaluation.id).in_(removal.evaluations)))
    if removal.deployments:
        session.exec(delete(Deployment).where(col(Deployment.id).in_(removal.deployments)))
    lifecycle.forget_output_models(session, removal.models, keep=removal.jobs)
    for model_id in removal.models:
        session.exec(delete(Model).where(col(Model.id) == model_id))
    try:
        lifecycle.delete_finished(session, removal.jobs)
    except lifecycle.NotFinished as exc:
        session.rollback()
        raise InUse(f"cannot delete: {exc}") from None
    if removal.datasets:
        session.exec(delete(Dataset).where(col(Dataset.id).in_(removal.datasets)))
    session.flush()
    trash = store.move_aside(removal.files)
    try:
        session.commit()
    except Exception:
        if trash is not None:
            store.restore(trash)
        raise
    removal.files = store.trashed(trash) if trash is not None else []
    if trash is not None:
        store.purge(trash)
    log.info("deleted %s", removal.model_dump(exclude_defaults=True))
    return removal


def _ids(ids: Iterable[int | None]) -> str:
    return ", ".join(str(i) for i in ids)


# --------------------------------------------------------------------------- gc


class GarbageReport(BaseModel):
    """What ``textcls gc`` removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    restored: list[str] = Field(
        default_factory=list, description="artifacts an interrupted deletion moved aside, put back"
    )
    trash: list[str] = Field(default_factory=list, description="moved-aside artifacts removed")
    staging: list[str] = Field(default_factory=list, description="stale tmp/ entries removed")
    orphans: list[str] = Field(default_factory=list, description="artifacts no row names")
    checkpoints: list[str] = Field(default_factory=list, description="stale checkpoints")
    expired: Removal = Field(default_factory=Removal, description="models past --older-than")


def expired_models(session: Session, older_than_days: float) -> list[int]:
    """Models older than the cutoff that nothing keeps.

    Kept: protected models (served, in the rollback history, in use by an
    unfinished job or a running pipeline), models newer than the cutoff, and
    every ancestor of a kept model (a lineage is never cut in the middle).
    """
    cutoff = utcnow() - timedelta(days=older_than_days)
    parent = {m: p for m, p in session.exec(select(Model.id, Model.parent_id)) if m is not None}
    old = set(session.exec(select(Model.id).where(col(Model.created_at) < cutoff)))
    keep = set(protected_models(session)) | (set(parent) - old)
    for model_id in list(keep):
        m = parent.get(model_id)
        while m is not None and m not in keep:
            keep.add(m)
            m = parent.get(m)
    return sorted(m for m in parent if m is not None and m not in keep)


def collect_garbage(
    session: Session,
    store: ArtifactStore,
    *,
    older_than_days: float | None = None,
    min_age_seconds: float = STALE_TMP_SECONDS,
    dry_run: bool = False,
) -> GarbageReport:
    """Resolve interrupted deletions, remove stale staging entries, orphans and stale
    checkpoints, and (with ``older_than_days``) the models nothing keeps.

    Leftovers younger than ``min_age_seconds`` are left alone: an orphan that
    young may be a model being registered right now.
    """
    report = GarbageReport(dry_run=dry_run)
    if older_than_days is not None:
        lock_deployments(session)
        expired = expired_models(session, older_than_days)
        report.expired = _model_removal(session, expired)
        if expired and not dry_run:
            report.expired = _apply(session, store, report.expired)
        session.rollback()  # a dry run (or nothing to do) still took the lock
    for item in trashed_artifacts(session, store):
        if age_seconds(item.folder) < min_age_seconds:
            continue
        where = f"{TRASH}/{item.folder.name}/{item.relpath}"
        (report.restored if item.restorable else report.trash).append(where)
        if not dry_run and item.restorable:
            store.restore(item.folder, [item.relpath])
    if not dry_run:
        for where in report.restored + report.trash:
            store.purge(store.root / TRASH / where.split("/")[1])
    report.staging = [
        f"{TMP}/{e.name}" for e in stale_staging(session, store, max_age=min_age_seconds)
    ]
    report.orphans = [e.relpath for e in orphans(session, store) if e.age() >= min_age_seconds]
    report.checkpoints = stale_checkpoints(session, store)
    session.rollback()
    if not dry_run:
        for relpath in report.staging + report.orphans + report.checkpoints:
            store.remove(relpath)
    log.info("gc: %s", report.model_dump(exclude_defaults=True))
    return report
