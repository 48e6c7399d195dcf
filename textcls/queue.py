"""The job queue: the Celery app (Redis broker, ``gpu`` and ``cpu`` queues), sending
and revoking job messages, and a read-only look into the broker.

The database, not a Celery result backend, holds job state, so results are
ignored and messages carry ``(job_id, attempt)`` only. The app is defined here,
in the core, because the lifecycle sends messages; the worker package binds
its task to this same app (``workers.tasks``).

Celery's Redis transport (kombu) keeps each queue as a Redis list named after
the queue (priority levels as ``<queue>\\x06\\x16<n>``), and a message taken by
a worker but not yet acknowledged in the hash ``unacked``. A Redis server that
keeps nothing on disk loses both when it restarts; the lifecycle's lost-message
sweep compares them with the database (:func:`job_messages`).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu import Queue

from textcls.settings import get_settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "textcls.run_job"
QUEUES = ("gpu", "cpu")

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("textcls", broker=settings.resolved_broker_url())
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="cpu",
        task_ignore_result=True,
        # A message is acknowledged after the job ends, so a worker that dies
        # mid-job does not lose it; prefetch 1 so a long job holds one message.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A Redis restart must not stop running jobs: they beat to the database
        # and finish; their message cannot be acked any more, and a redelivery is
        # skipped by the job's (id, attempt) claim. (Celery 6 flips this default.)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # An unacked message comes back after this long; the job's own
            # (id, attempt) check stops a second delivery from running it twice.
            "visibility_timeout": settings.visibility_timeout,
        },
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@lru_cache(maxsize=1)
def celery_app() -> Celery:
    """The process's one Celery app, made on first use (not at import)."""
    return make_celery()


def send_job(job_id: int, attempt: int, queue: str, task_id: str | None = None) -> str:
    """Enqueue a job's message (under ``task_id`` if given); returns the Celery task id."""
    result = celery_app().send_task(
        RUN_JOB_TASK, args=[job_id, attempt], queue=queue, task_id=task_id
    )
    return str(result.id)


def revoke(task_id: str) -> None:
    """Ask workers to drop a message; best effort, the claim ignores stale messages anyway."""
    try:
        celery_app().control.revoke(task_id)
    except Exception:
        log.debug("revoke of %s failed", task_id, exc_info=True)


# --------------------------------------------------------------------------- broker look-up


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold one queue's messages, one per priority level."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS if p]


def job_of_message(message: dict[str, Any]) -> tuple[int, int] | None:
    """``(job id, attempt)`` of a ``run_job`` message, or None for anything else."""
    headers = message.get("headers") or {}
    if headers.get("task") != RUN_JOB_TASK:
        return None
    body: Any = message.get("body")
    if (message.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return int(args[0]), int(args[1])


def _decode(raw: bytes | str) -> tuple[int, int] | None:
    try:
        return job_of_message(json.loads(raw))
    except (ValueError, TypeError, KeyError, IndexError):
        log.debug("unreadable broker message: %r", raw[:200])
        return None


def job_messages(broker_url: str, queues: Iterable[str]) -> set[tuple[int, int]]:
    """``(job id, attempt)`` of every job message waiting in ``queues`` or unacked.

    Raises when Redis cannot be reached: then nothing can be concluded.
    """
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=3, socket_timeout=10)
    found: set[tuple[int, int]] = set()
    try:
        for queue in sorted(set(queues)):
            for key in queue_keys(queue):
                for raw in client.lrange(key, 0, -1):
                    if (job := _decode(raw)) is not None:
                        found.add(job)
        for raw in client.hvals(UNACKED_KEY):
            try:
                message = json.loads(raw)[0]
                job = job_of_message(message)
            except (ValueError, TypeError, KeyError, IndexError):
                continue
            if job is not None:
                found.add(job)
    finally:
        client.close()
    return found
