"""The Celery app: Redis broker, two queues (``gpu`` and ``cpu``), late acks.

The database, not a Celery result backend, holds job state, so results are
ignored. Messages carry ``(job_id, attempt)`` only.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from textcls.settings import get_settings

RUN_JOB_TASK = "textcls.run_job"
QUEUES = ("gpu", "cpu")


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("textcls", broker=settings.resolved_broker_url(), include=["workers.tasks"])
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


celery_app = make_celery()


def send_job(job_id: int, attempt: int, queue: str, task_id: str | None = None) -> str:
    """Enqueue a job's message (under ``task_id`` if given); returns the Celery task id."""
    result = celery_app.send_task(
        RUN_JOB_TASK, args=[job_id, attempt], queue=queue, task_id=task_id
    )
    return str(result.id)
