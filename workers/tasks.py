"""Celery tasks: thin wrappers that hand a job id to the runner.

The app is the core's (:func:`textcls.queue.celery_app`): the lifecycle sends
to it, and ``celery -A workers.tasks worker`` runs this module's task on it.
"""

from __future__ import annotations

import logging

from celery import Task

import workers.handlers  # noqa: F401  (registers the job kinds)
from textcls.queue import RUN_JOB_TASK
from textcls.queue import celery_app as _celery_app
from workers.runner import execute_job

log = logging.getLogger(__name__)

celery_app = _celery_app()


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: int, attempt: int) -> str:
    return execute_job(int(job_id), int(attempt), worker=str(self.request.hostname or "worker"))
