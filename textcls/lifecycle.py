"""The job lifecycle: the one owner of every write to a job's state.

A job is ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``,
and may go back from ``running`` to ``queued`` under a new attempt when its
worker died. Everything that moves a job goes through this module:

- :func:`submit` stores a queued job (with or without a pipeline parent) and
  sends its message;
- :func:`transition` is the guarded UPDATE (id, attempt, status) that keeps a
  redelivered message or a stale worker from touching a job it lost; the
  worker's :func:`claim`, :func:`beat`, :func:`finish` and :func:`succeed`
  are built on it;
- :func:`cancel` stops a job and its tree;
- :func:`requeue_stale_jobs`, :func:`resend_lost_messages` and
  :func:`advance_stalled_pipelines` are the reaper's sweeps (run by one
  process at a time: :class:`textcls.db.SingletonLock`);
- :func:`advance` moves a pipeline on when a child ends (plan in
  :mod:`textcls.pipelines`, report in :mod:`textcls.report`, promotion through
  :func:`textcls.deployments.promote`, the same rules as the API's); each
  step's event goes into the pipeline's own log (:func:`textcls.joblog.note`);
- :func:`forget_output_models` and :func:`delete_finished` are the job-row
  writes of a deletion (rules in :mod:`textcls.retention`).

Every function takes ids and opens its own sessions (except :func:`submit`
and the deletion writes, which work in the caller's), so each can be called
again after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.sql.dml import Update
from sqlmodel import Session, col, select

from textcls import deployments, joblog, queue
from textcls.db import retry_db, session_scope
from textcls.jobs import PipelineParams
from textcls.models import FINAL_STATUSES, Job, JobStatus, Model, utcnow
from textcls.pipelines import (
    STEP_KEY,
    Step,
    child_queue,
    expected_children,
    pipeline_params,
    plan,
    step_of,
)
from textcls.report import build_report
from textcls.settings import get_settings
from textcls.store import ArtifactStore, checkpoint_relpath

log = logging.getLogger(__name__)

# Pipeline parents do no work themselves (their children do), so they do not beat.
NO_HEARTBEAT_KINDS = ("pipeline",)
CANCELLED_BY_REQUEST = "cancelled by request"


class QueueUnavailable(Exception):
    """A job's message could not be sent; the job was failed with the reason."""


# --------------------------------------------------------------------------- transitions


def _guarded(job_id: int, attempt: int | None, current: str | Collection[str]) -> Update:
    statuses = [current] if isinstance(current, str) else list(current)
    stmt = update(Job).where(col(Job.id) == job_id).where(col(Job.status).in_(statuses))
    if attempt is not None:
        stmt = stmt.where(col(Job.attempt) == attempt)
    return stmt


def final_values(status: JobStatus, error: str | None = None) -> dict[str, Any]:
    """The columns every final state sets."""
    return {
        "status": status,
        "finished_at": utcnow(),
        "stage": "done" if status == JobStatus.succeeded else str(status),
        "error": error,
    }


def transition(
    job_id: int, attempt: int | None, current: str | Collection[str], /, **values: Any
) -> bool:
    """Update the job only if it is still at ``attempt`` (None: any) in ``current``.

    Returns whether it was. ``updated_at`` is always set.
    """
    with session_scope() as s:
        res = s.exec(_guarded(job_id, attempt, current).values(updated_at=utcnow(), **values))
        s.commit()
        return bool(res.rowcount)


def _ended(job_id: int) -> None:
    """After a job reached a final state: its checkpoint goes, its pipeline (if any) moves on.

    The job's own state is already committed, so nothing here raises on a
    database outage: advancing is retried for ``db_retry_seconds``, and if the
    database stays away the reaper's :func:`advance_stalled_pipelines` does it.
    """
    drop_checkpoint(job_id)
    try:
        parent = retry_db(lambda: _parent_of(job_id), f"job {job_id}'s pipeline")
        if parent is None:
            return
        retry_db(lambda: advance(parent), f"advancing pipeline {parent}")
    except (OperationalError, InterfaceError) as exc:
        log.warning(
            "job %s ended but the database is away (%s); the reaper advances its pipeline",
            job_id,
            str(exc).splitlines()[0],
        )
    except Exception:
        log.exception("advancing the pipeline of job %s failed", job_id)
        with contextlib.suppress(OperationalError, InterfaceError):
            parent_id = _parent_of(job_id)
            if parent_id is not None:
                transition(
                    parent_id,
                    None,
                    JobStatus.running,
                    **final_values(JobStatus.failed, "internal error while advancing the pipeline"),
                )


def _parent_of(job_id: int) -> int | None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        return job.parent_id if job is not None else None


def drop_checkpoint(job_id: int) -> None:
    """Remove a job's training checkpoint (best effort: ``textcls check`` lists leftovers)."""
    try:
        ArtifactStore().remove(checkpoint_relpath(job_id))
    except Exception as exc:  # a folder's OSError, or an object store's error
        log.warning("could not remove the checkpoint of job %s: %s", job_id, exc)


# --------------------------------------------------------------------------- submit


def submit(
    session: Session,
    kind: str,
    params: dict[str, Any],
    queue_name: str,
    *,
    parent: Job | None = None,
) -> Job:
    """Store a queued job, then send its message; commits the caller's session.

    The task id is chosen up front, so the row is complete in one commit (with
    the parent's stage, for a pipeline child). A broker failure fails the job
    with the reason and raises :class:`QueueUnavailable`.
    """
    task_id = str(uuid.uuid4())
    job = Job(
        kind=kind,
        params=params,
        queue=queue_name,
        parent_id=parent.id if parent is not None else None,
        task_id=task_id,
    )
    session.add(job)
    if parent is not None:
        session.flush()
        parent.stage = f"{params.get(STEP_KEY, kind)} (job {job.id})"[:200]
        parent.updated_at = utcnow()
        session.add(parent)
    session.commit()
    session.refresh(job)
    assert job.id is not None
    try:
        queue.send_job(job.id, job.attempt, queue_name, task_id=task_id)
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        reason = f"could not reach the job queue: {exc}"
        transition(job.id, job.attempt, JobStatus.queued, **final_values(JobStatus.failed, reason))
        session.refresh(job)
        raise QueueUnavailable(str(exc)) from exc
    return job


# --------------------------------------------------------------------------- a worker's side


def claim(job_id: int, attempt: int, worker: str) -> Job | None:
    """Move a queued job to running for this attempt; None if it is not ours to run."""
    now = utcnow()
    claimed = transition(
        job_id,
        attempt,
        JobStatus.queued,
        status=JobStatus.running,
        started_at=now,
        heartbeat_at=now,
        worker=worker[:200],
        progress=0.0,
        stage="starting",
    )
    if not claimed:
        return None
    # The job is ours now: reading it back must outlast a database blip, or it
    # would sit "running" with nobody on it until the reaper requeues it.
    return retry_db(lambda: read_job(job_id), f"job {job_id}")


def read_job(job_id: int) -> Job | None:
    """The job row, detached from its session."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is not None:
            s.expunge(job)
        return job


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learnt: whether the attempt still owns the job, and whether
    someone asked it to stop."""

    owned: bool
    cancel_requested: bool


def beat(job_id: int, attempt: int, **values: Any) -> Beat:
    """Mark a running job alive (with progress or stage in ``values``) if this attempt owns it."""
    ok = transition(job_id, attempt, JobStatus.running, heartbeat_at=utcnow(), **values)
    if not ok:
        # Reaped, or the row changed hands: stop working on it.
        return Beat(owned=False, cancel_requested=True)
    with session_scope() as s:
        wanted = s.exec(select(Job.cancel_requested).where(col(Job.id) == job_id)).first()
    return Beat(owned=True, cancel_requested=bool(wanted))


def cancel_requested(job_id: int) -> bool:
    """Whether someone asked the job to stop (a cheap read, between heartbeats)."""
    with session_scope() as s:
        return bool(s.exec(select(Job.cancel_requested).where(col(Job.id) == job_id)).first())


def finish(job_id: int, attempt: int, status: JobStatus, error: str | None = None) -> bool:
    """Set a final status other than success if this attempt still owns the running job."""
    done = transition(job_id, attempt, JobStatus.running, **final_values(status, error))
    if done:
        _ended(job_id)
    return done


def succeed(
    job_id: int,
    attempt: int,
    metrics: dict[str, Any],
    record: Callable[[Session, Job], int | None],
    *,
    replay: Callable[[Session, Job], None] | None = None,
    undo: Callable[[], None] | None = None,
) -> bool:
    """Mark the running job succeeded, with what ``record`` adds, in one transaction.

    ``record(session, job)`` adds the job's rows (its model, evaluations) and
    returns the output model id. ``replay`` runs instead when an earlier try's
    commit reached the database although the client saw an error; ``undo``
    runs when the commit fails. Returns False when the attempt lost the job.
    """
    with session_scope() as s:
        job = s.get(Job, job_id)
        if (
            job is not None
            and job.status == JobStatus.succeeded
            and job.attempt == attempt
            and job.finished_at is not None
        ):
            if replay is not None:
                replay(s, job)
            # The first try may have stopped before its pipeline moved on: _ended again.
        elif job is None or job.status != JobStatus.running or job.attempt != attempt:
            return False
        else:
            _commit_success(s, job, metrics, record(s, job), undo)
    _ended(job_id)
    return True


def _commit_success(
    s: Session,
    job: Job,
    metrics: dict[str, Any],
    output_model_id: int | None,
    undo: Callable[[], None] | None,
) -> None:
    """Set the success columns on the job and commit; ``undo`` runs if the commit fails."""
    for key, value in final_values(JobStatus.succeeded).items():
        setattr(job, key, value)
    job.progress = 1.0
    job.metrics = metrics
    job.output_model_id = output_model_id
    job.updated_at = utcnow()
    s.add(job)
    try:
        s.commit()
    except Exception:
        if undo is not None:
            undo()
        raise


# --------------------------------------------------------------------------- cancel


def cancel(job_id: int) -> None:
    """Cancel a job and its unfinished children (a pipeline's steps).

    A queued job is cancelled at once (and its message revoked); a running one
    is asked to stop and does so at its next progress report; a pipeline
    parent, which does no work itself, is cancelled at once. A step cancelled
    on its own stops its pipeline with the reason.
    """
    job = read_job(job_id)
    if job is None or job.status in FINAL_STATUSES:
        return
    _cancel_tree(job)
    after = read_job(job_id)
    if after is not None and after.status in FINAL_STATUSES:
        _ended(job_id)


def _cancel_tree(job: Job) -> None:
    assert job.id is not None
    cancelled = final_values(JobStatus.cancelled, CANCELLED_BY_REQUEST)
    if job.status == JobStatus.queued:
        if transition(job.id, job.attempt, JobStatus.queued, **cancelled):
            drop_checkpoint(job.id)  # a requeued job may have one
            if job.task_id:
                queue.revoke(job.task_id)
        else:  # claimed meanwhile: ask the worker instead
            transition(job.id, None, JobStatus.running, cancel_requested=True)
    elif job.kind == "pipeline":
        transition(job.id, None, JobStatus.running, cancel_requested=True, **cancelled)
    else:
        transition(job.id, job.attempt, JobStatus.running, cancel_requested=True)
    with session_scope() as s:
        children = list(s.exec(select(Job).where(col(Job.parent_id) == job.id)))
        for child in children:
            s.expunge(child)
    for child in children:
        if child.status not in FINAL_STATUSES:
            _cancel_tree(child)


# --------------------------------------------------------------------------- deletion


class NotFinished(Exception):
    """A job to delete is not (or no longer) in a final state."""


def forget_output_models(
    session: Session, model_ids: Collection[int], *, keep: Collection[int] = ()
) -> list[int]:
    """Clear ``output_model_id`` where it names a model being deleted (caller's transaction).

    Jobs in ``keep`` (deleted too) are left alone. The stage says which model
    went; returns the ids of the jobs changed.
    """
    if not model_ids:
        return []
    stmt = select(Job).where(col(Job.output_model_id).in_(list(model_ids)))
    changed = []
    for job in session.exec(stmt):
        if job.id in keep:
            continue
        job.stage = f"{job.stage or job.status}; output model {job.output_model_id} deleted"[:200]
        job.output_model_id = None
        job.updated_at = utcnow()
        session.add(job)
        assert job.id is not None
        changed.append(job.id)
    return changed


def delete_finished(session: Session, job_ids: list[int]) -> None:
    """Delete finished jobs' rows in this order (children first), in the caller's transaction.

    Guarded like :func:`transition`: a job not in a final state is not
    deleted, and :class:`NotFinished` is raised (the caller rolls back).
    """
    for job_id in job_ids:
        stmt = delete(Job).where(col(Job.id) == job_id).where(col(Job.status).in_(FINAL_STATUSES))
        if not session.exec(stmt).rowcount:
            raise NotFinished(f"job {job_id} is not finished")


# --------------------------------------------------------------------------- the reaper's sweeps


def requeue_stale_jobs() -> list[tuple[int, str]]:
    """Requeue (new attempt) or fail each running job whose heartbeat went silent.

    A worker killed outright leaves its message unacked until the broker's
    visibility timeout, and its job ``running``. A job silent for
    ``heartbeat_timeout`` is requeued under a new attempt number (so the old
    message, when it comes back, is ignored), or failed with the reason once
    ``max_attempts`` is spent. Returns (job id, action) pairs.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    with session_scope() as s:
        stale = list(
            s.exec(
                select(Job)
                .where(col(Job.status) == JobStatus.running)
                .where(col(Job.heartbeat_at) < cutoff)
                .where(col(Job.kind).not_in(NO_HEARTBEAT_KINDS))
            )
        )
    actions: list[tuple[int, str]] = []
    for job in stale:
        action = _reap(job, settings.max_attempts)
        if action is not None:
            assert job.id is not None
            actions.append((job.id, action))
    return actions


def _reap(job: Job, max_attempts: int) -> str | None:
    assert job.id is not None
    silent = (utcnow() - job.heartbeat_at).total_seconds() if job.heartbeat_at else 0.0
    reason = (
        f"worker lost: no heartbeat from {job.worker or 'the worker'} for {silent:.0f} s "
        f"(attempt {job.attempt + 1} of {max_attempts})"
    )
    if job.cancel_requested or job.attempt + 1 >= max_attempts:
        status = JobStatus.cancelled if job.cancel_requested else JobStatus.failed
        error = f"cancelled; {reason}" if job.cancel_requested else reason
        if not transition(job.id, job.attempt, JobStatus.running, **final_values(status, error)):
            return None  # another reaper or the worker itself got there first
        log.warning("job %s %s: %s", job.id, status, reason)
        _ended(job.id)
        return str(status)
    attempt = job.attempt + 1
    task_id = str(uuid.uuid4())
    requeued = transition(
        job.id,
        job.attempt,
        JobStatus.running,
        status=JobStatus.queued,
        attempt=attempt,
        task_id=task_id,
        worker=None,
        heartbeat_at=None,
        started_at=None,
        progress=0.0,
        stage=f"requeued: {reason}"[:200],
    )
    if not requeued:
        return None
    try:
        queue.send_job(job.id, attempt, job.queue, task_id=task_id)
    except Exception as exc:
        log.error("could not requeue job %s: %s", job.id, exc)
        error = f"{reason}; requeue failed: {exc}"
        if transition(job.id, attempt, JobStatus.queued, **final_values(JobStatus.failed, error)):
            _ended(job.id)
        return "failed"
    log.warning("job %s requeued: %s", job.id, reason)
    return "requeued"


def resend_lost_messages() -> list[tuple[int, str]]:
    """Send again the message of each job queued for long whose message the broker lost.

    A Redis server that keeps nothing on disk forgets every queued message when
    it restarts, while the database still says ``queued``. A job queued for
    longer than ``requeue_lost_after`` seconds whose ``(id, attempt)`` is in no
    broker queue and not unacked is sent again under the same attempt: if the
    old message turns up after all, the claim lets only one of the two run it.
    A queued step of a pipeline that already ended is cancelled instead.
    Returns (job id, action) pairs.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.requeue_lost_after)
    with session_scope() as s:
        waiting = list(
            s.exec(
                select(Job)
                .where(col(Job.status) == JobStatus.queued)
                .where(col(Job.updated_at) < cutoff)
                .order_by(col(Job.id))
            )
        )
        parent_ids = {j.parent_id for j in waiting if j.parent_id is not None}
        ended_parents = {
            p.id: p.status
            for p in s.exec(select(Job).where(col(Job.id).in_(parent_ids)))
            if p.status in FINAL_STATUSES
        }
    if not waiting:
        return []
    try:
        present = queue.job_messages(settings.resolved_broker_url(), {j.queue for j in waiting})
    except Exception as exc:
        log.warning("cannot read the broker's queues (%s); checking again next sweep", exc)
        return []
    actions: list[tuple[int, str]] = []
    for job in waiting:
        assert job.id is not None
        if (job.id, job.attempt) in present:
            continue
        ended = ended_parents.get(job.parent_id) if job.parent_id is not None else None
        if ended is not None:
            error = f"its pipeline (job {job.parent_id}) is already {ended}"
            if transition(
                job.id, job.attempt, JobStatus.queued, **final_values(JobStatus.cancelled, error)
            ):
                log.warning("job %s cancelled: its pipeline %s is %s", job.id, job.parent_id, ended)
                actions.append((job.id, "cancelled"))
            continue
        task_id = str(uuid.uuid4())
        if not transition(
            job.id,
            job.attempt,
            JobStatus.queued,
            stage="message lost by the broker; sent again",
            task_id=task_id,
        ):
            continue  # started or cancelled meanwhile
        try:
            queue.send_job(job.id, job.attempt, job.queue, task_id=task_id)
        except Exception as exc:  # the next sweep tries again
            log.error("could not re-send the lost message of job %s: %s", job.id, exc)
            continue
        log.warning(
            "job %s (attempt %s) was queued but its message was not in the broker: sent again",
            job.id,
            job.attempt,
        )
        actions.append((job.id, "resent"))
    return actions


def advance_stalled_pipelines() -> list[tuple[int, str]]:
    """Advance (or finish) each running pipeline that nothing else will move on.

    A child's worker advances its pipeline right after the child ends; a
    database outage or a kill between the two leaves the parent ``running``
    with every child final. A parent in that state for ``heartbeat_timeout``
    seconds (or, with no child at all, whose own worker died before
    submitting the first step) is advanced here: :func:`advance` is safe to
    call again. Returns (parent id, new status or "advanced") pairs.
    """
    cutoff = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout)
    with session_scope() as s:
        parents = set(
            s.exec(
                select(Job.id)
                .where(col(Job.kind) == "pipeline")
                .where(col(Job.status) == JobStatus.running)
                .where(col(Job.updated_at) < cutoff)
            )
        )
        # Parents with a step still at work, or one that just ended (its worker
        # is advancing the pipeline now), are not stalled.
        busy = set(
            s.exec(
                select(Job.parent_id)
                .where(col(Job.parent_id).in_(parents))
                .where(
                    or_(
                        col(Job.status).not_in(FINAL_STATUSES),
                        col(Job.finished_at).is_(None),
                        col(Job.finished_at) >= cutoff,
                    )
                )
            )
        )
    actions: list[tuple[int, str]] = []
    for parent_id in sorted(p for p in parents - busy if p is not None):
        advance(parent_id)
        after = read_job(parent_id)
        action = "advanced" if after is None or after.status == JobStatus.running else after.status
        log.warning("pipeline %s was stalled with every step final: %s", parent_id, action)
        actions.append((parent_id, str(action)))
    return actions


# --------------------------------------------------------------------------- pipelines


def _lock_parent(session: Session, parent_id: int) -> Job | None:
    """The parent row, locked until the session's transaction ends.

    PostgreSQL locks the row. SQLite has no row locks: a write as the first
    statement takes the database's write lock for the transaction instead, so
    two advances (a worker's and the reaper's) run one after the other and the
    second sees the first one's child.
    """
    stmt = select(Job).where(col(Job.id) == parent_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    else:
        session.exec(update(Job).where(col(Job.id) == parent_id).values(updated_at=Job.updated_at))
    return session.exec(stmt).first()


def _finish_parent(s: Session, parent: Job, status: JobStatus, error: str | None = None) -> None:
    """End a locked pipeline parent in the caller's transaction, and commit."""
    for key, value in final_values(status, error).items():
        setattr(parent, key, value)
    parent.updated_at = utcnow()
    if status == JobStatus.succeeded:
        parent.progress = 1.0
    s.add(parent)
    s.commit()
    assert parent.id is not None
    _note(parent.id, f"pipeline {status}" + (f": {error}" if error else ""))


def advance(parent_id: int) -> None:
    """Move a pipeline on after one of its children changed; safe to call any time.

    A failed or cancelled step stops the rest with its reason; otherwise the
    next step is submitted, or, when all are done, the report is frozen into
    the parent's metrics, the fastest variant within budget is named (and
    promoted if asked, by the same rules as ``POST /models/{id}/promote``).
    """
    with session_scope() as s:
        parent = _lock_parent(s, parent_id)
        if parent is None or parent.kind != "pipeline" or parent.status != JobStatus.running:
            return
        params = pipeline_params(parent)
        children = list(
            s.exec(select(Job).where(col(Job.parent_id) == parent_id).order_by(col(Job.id)))
        )
        bad = next(
            (c for c in children if c.status in (JobStatus.failed, JobStatus.cancelled)), None
        )
        if bad is not None:
            step = (bad.params or {}).get(STEP_KEY, bad.kind)
            error = f"step {step} (job {bad.id}) {bad.status}: {bad.error or ''}".strip()
            status = JobStatus.failed if bad.status == JobStatus.failed else JobStatus.cancelled
            _finish_parent(s, parent, status, error)
            return
        if any(c.status not in FINAL_STATUSES for c in children):
            return
        try:
            step = plan(params, children)
        except ValueError as exc:
            _finish_parent(s, parent, JobStatus.failed, str(exc))
            return
        parent.progress = min(0.99, len(children) / max(1, expected_children(params)))
        if step is not None:
            _submit_step(s, parent, params, step, after=children[-1] if children else None)
            return
        _conclude(s, parent, params)


def _submit_step(
    s: Session, parent: Job, params: PipelineParams, step: Step, *, after: Job | None
) -> None:
    """Submit a pipeline's next child (the parent's lock ends with the commit).

    ``after`` is the step that just ended, named in the parent's log.
    """
    assert parent.id is not None
    before = "" if after is None else f" after {_describe_step(after)}"
    child_params = {**step.params, STEP_KEY: step.name}
    try:
        child = submit(s, step.kind, child_params, child_queue(step, params), parent=parent)
    except QueueUnavailable as exc:
        s.rollback()
        locked = _lock_parent(s, parent.id)
        if locked is not None and locked.status == JobStatus.running:
            _finish_parent(s, locked, JobStatus.failed, f"could not submit {step.name}: {exc}")
        return
    _note(parent.id, f"submitted step {step.name} as job {child.id}{before}")


def _describe_step(child: Job) -> str:
    out = f" (model {child.output_model_id})" if child.output_model_id is not None else ""
    return f"step {step_of(child)} (job {child.id}) {child.status}{out}"


def _note(job_id: int, message: str) -> None:
    """Log a pipeline event and keep it in the pipeline's own log (``GET /jobs/{id}/logs``)."""
    joblog.note(ArtifactStore(), job_id, message, logger=log)


def _conclude(s: Session, parent: Job, params: PipelineParams) -> None:
    """All steps done: freeze the report, name (and maybe promote) the chosen variant."""
    report = build_report(s, parent)
    parent.metrics = report
    chosen = report.get("chosen_model_id")
    if chosen is None:
        _finish_parent(s, parent, JobStatus.failed, "no variant was evaluated")
        return
    parent.output_model_id = chosen
    if not params.promote:
        _finish_parent(s, parent, JobStatus.succeeded)
        return
    model = s.get(Model, chosen)
    try:
        if model is None:
            raise deployments.DeploymentRefused(f"model {chosen} is gone")
        change = deployments.promote(s, model)
    except deployments.DeploymentRefused as exc:
        _finish_parent(s, parent, JobStatus.failed, f"model {chosen} was not promoted: {exc}")
        return
    parent.metrics = {**report, "promoted_deployment_id": change.deployment.id}
    _finish_parent(s, parent, JobStatus.succeeded)
    deployments.publish_deployment(change.deployment)
