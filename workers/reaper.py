"""Finds jobs whose worker died and runs them again or fails them.

A worker killed outright (SIGKILL of its main process) leaves its message
unacked until the broker's visibility timeout, and its job ``running``. The
control plane runs :func:`reap_stale_jobs` every few seconds: a running job
whose heartbeat is older than ``heartbeat_timeout`` is requeued under a new
attempt number (so the old message, when it comes back, is ignored), or
failed with the reason once ``max_attempts`` is spent.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import col, select

from textcls.db import session_scope
from textcls.models import FINAL_STATUSES, Job, JobStatus, utcnow
from textcls.settings import get_settings

log = logging.getLogger(__name__)

# Pipeline parents do no work themselves (their children do), so they do not beat.
NO_HEARTBEAT_KINDS = ("pipeline",)


def reap_stale_jobs() -> list[tuple[int, str]]:
    """One sweep; returns (job id, action) pairs for what it changed."""
    from workers.celery_app import send_job

    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    actions: list[tuple[int, str]] = []
    with session_scope() as s:
        stale = list(
            s.exec(
                select(Job)
                .where(col(Job.status) == JobStatus.running)
                .where(col(Job.heartbeat_at) < cutoff)
                .where(col(Job.kind).not_in(NO_HEARTBEAT_KINDS))
            )
        )
    for job in stale:
        assert job.id is not None
        silent = (utcnow() - job.heartbeat_at).total_seconds() if job.heartbeat_at else 0.0
        reason = (
            f"worker lost: no heartbeat from {job.worker or 'the worker'} for {silent:.0f} s "
            f"(attempt {job.attempt + 1} of {settings.max_attempts})"
        )
        requeue = job.attempt + 1 < settings.max_attempts and not job.cancel_requested
        now = utcnow()
        with session_scope() as s:
            stmt = (
                update(Job)
                .where(col(Job.id) == job.id)
                .where(col(Job.attempt) == job.attempt)
                .where(col(Job.status) == JobStatus.running)
            )
            if requeue:
                stmt = stmt.values(
                    status=JobStatus.queued,
                    attempt=job.attempt + 1,
                    worker=None,
                    heartbeat_at=None,
                    started_at=None,
                    progress=0.0,
                    stage=f"requeued: {reason}"[:200],
                    updated_at=now,
                )
            elif job.cancel_requested:
                stmt = stmt.values(
                    status=JobStatus.cancelled,
                    error=f"cancelled; {reason}",
                    finished_at=now,
                    updated_at=now,
                    stage="cancelled",
                )
            else:
                stmt = stmt.values(
                    status=JobStatus.failed,
                    error=reason,
                    finished_at=now,
                    updated_at=now,
                    stage="failed",
                )
            res = s.exec(stmt)
            s.commit()
            if res.rowcount == 0:
                continue  # another reaper or the worker itself got there first
        if requeue:
            try:
                task_id = send_job(job.id, job.attempt + 1, job.queue)
            except Exception as exc:
                log.error("could not requeue job %s: %s", job.id, exc)
                with session_scope() as s:
                    s.exec(
                        update(Job)
                        .where(col(Job.id) == job.id)
                        .where(col(Job.status) == JobStatus.queued)
                        .values(
                            status=JobStatus.failed,
                            error=f"{reason}; requeue failed: {exc}",
                            finished_at=utcnow(),
                        )
                    )
                    s.commit()
                actions.append((job.id, "failed"))
                continue
            with session_scope() as s:
                row = s.get(Job, job.id)
                if row is not None:
                    row.task_id = task_id
                    s.add(row)
                    s.commit()
            log.warning("job %s requeued: %s", job.id, reason)
            actions.append((job.id, "requeued"))
        else:
            log.warning("job %s failed: %s", job.id, reason)
            actions.append((job.id, "failed" if not job.cancel_requested else "cancelled"))
            from workers.orchestrator import child_finished

            child_finished(job.id)
    return actions


def requeue_lost_messages() -> list[tuple[int, str]]:
    """Send again the message of each job queued for long whose message the broker lost.

    A Redis server that keeps nothing on disk forgets every queued message when
    it restarts, while the database still says ``queued``. A job queued for
    longer than ``requeue_lost_after`` seconds whose ``(id, attempt)`` is in no
    broker queue and not unacked is sent again under the same attempt: if the
    old message turns up after all, the claim lets only one of the two run it.
    A queued step of a pipeline that already ended is cancelled instead.
    Returns (job id, action) pairs.
    """
    from workers.broker import job_messages
    from workers.celery_app import send_job

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
        present = job_messages(settings.resolved_broker_url(), {j.queue for j in waiting})
    except Exception as exc:
        log.warning("cannot read the broker's queues (%s); checking again next sweep", exc)
        return []
    actions: list[tuple[int, str]] = []
    for job in waiting:
        assert job.id is not None
        if (job.id, job.attempt) in present:
            continue
        now = utcnow()
        ended = ended_parents.get(job.parent_id) if job.parent_id is not None else None
        stmt = (
            update(Job)
            .where(col(Job.id) == job.id)
            .where(col(Job.attempt) == job.attempt)
            .where(col(Job.status) == JobStatus.queued)
        )
        if ended is not None:
            stmt = stmt.values(
                status=JobStatus.cancelled,
                error=f"its pipeline (job {job.parent_id}) is already {ended}",
                stage="cancelled",
                finished_at=now,
                updated_at=now,
            )
        else:
            stmt = stmt.values(stage="message lost by the broker; sent again", updated_at=now)
        with session_scope() as s:
            res = s.exec(stmt)
            s.commit()
            if res.rowcount == 0:
                continue  # started or cancelled meanwhile
        if ended is not None:
            log.warning("job %s cancelled: its pipeline %s is %s", job.id, job.parent_id, ended)
            actions.append((job.id, "cancelled"))
            continue
        try:
            task_id = send_job(job.id, job.attempt, job.queue)
        except Exception as exc:  # the next sweep tries again
            log.error("could not re-send the lost message of job %s: %s", job.id, exc)
            continue
        with session_scope() as s:
            s.exec(update(Job).where(col(Job.id) == job.id).values(task_id=task_id))
            s.commit()
        log.warning(
            "job %s (attempt %s) was queued but its message was not in the broker: sent again",
            job.id,
            job.attempt,
        )
        actions.append((job.id, "resent"))
    return actions
