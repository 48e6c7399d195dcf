"""Celery tasks: thin wrappers that hand a job id to the runner.

The app is the core's (:func:`textcls.queue.celery_app`): the lifecycle sends
to it, and ``celery -A workers.tasks worker`` runs this module's task on it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_process_init

import workers.handlers  # noqa: F401  (registers the job kinds)
from textcls.queue import RUN_JOB_TASK
from textcls.queue import celery_app as _celery_app
from workers.metrics import serve_for_pool_process
from workers.runner import execute_job

log = logging.getLogger(__name__)

celery_app = _celery_app()


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: int, attempt: int) -> str:
    return execute_job(int(job_id), int(attempt), worker=str(self.request.hostname or "worker"))


@worker_process_init.connect
def _serve_metrics(**_kwargs: Any) -> None:
    """Each prefork pool process serves its own metrics (TEXTCLS_WORKER_METRICS_PORT)."""
    serve_for_pool_process()
