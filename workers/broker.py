"""Read-only look into the Redis broker: which job messages does it hold?

Celery's Redis transport (kombu) keeps each queue as a Redis list named after
the queue (priority levels as ``<queue>\\x06\\x16<n>``), and a message taken by
a worker but not yet acknowledged in the hash ``unacked``. A Redis server that
keeps nothing on disk loses both when it restarts; the reaper compares them
with the database to find queued jobs whose message is gone.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from typing import Any

from workers.celery_app import RUN_JOB_TASK

log = logging.getLogger(__name__)

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"


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
