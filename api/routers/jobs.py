"""``/jobs``: submit (validated, then enqueued), list, read, cancel."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from sqlmodel import Session, col, select

from api.deps import (
    FilterId,
    NameFilter,
    Offset,
    PathId,
    SessionDep,
    WriteAccess,
    get_or_404,
    newest_first,
)
from textcls.jobs import DATASET_FIELDS, KIND_PARAMS, MODEL_FIELDS, parse_params, queue_for
from textcls.models import (
    FINAL_STATUSES,
    Dataset,
    Job,
    JobCreate,
    JobPublic,
    JobStatus,
    Model,
    utcnow,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


def _unprocessable(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)


def validate_job(session: Session, body: JobCreate) -> tuple[dict[str, Any], str]:
    """Check kind, params and referenced ids; returns (normalised params, queue)."""
    if body.kind not in KIND_PARAMS:
        raise _unprocessable(
            [
                {
                    "loc": ["body", "kind"],
                    "msg": f"unknown job kind {body.kind!r}; known: {sorted(KIND_PARAMS)}",
                    "type": "value_error",
                }
            ]
        )
    try:
        params = parse_params(body.kind, body.params)
    except ValidationError as exc:
        raise _unprocessable(
            [
                {"loc": ["body", "params", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_context=False)
            ]
        ) from None
    errors = []
    for name in DATASET_FIELDS:
        value = getattr(params, name, None)
        if value is not None and session.get(Dataset, value) is None:
            errors.append(
                {
                    "loc": ["body", "params", name],
                    "msg": f"dataset {value} does not exist",
                    "type": "not_found",
                }
            )
    for name in MODEL_FIELDS:
        value = getattr(params, name, None)
        if value is not None and session.get(Model, value) is None:
            errors.append(
                {
                    "loc": ["body", "params", name],
                    "msg": f"model {value} does not exist",
                    "type": "not_found",
                }
            )
    if errors:
        raise _unprocessable(errors)
    return params.model_dump(mode="json", exclude_unset=True), queue_for(body.kind, params)


def submit_job(
    session: Session, kind: str, params: dict[str, Any], queue: str, parent_id: int | None = None
) -> Job:
    """Store a queued job, then enqueue its message; a broker failure fails the job.

    The task id is chosen up front, so the row is complete in one commit.
    """
    from workers.celery_app import send_job

    task_id = str(uuid.uuid4())
    job = Job(kind=kind, params=params, queue=queue, parent_id=parent_id, task_id=task_id)
    session.add(job)
    session.commit()
    session.refresh(job)
    assert job.id is not None
    try:
        send_job(job.id, job.attempt, queue, task_id=task_id)
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        job.status = JobStatus.failed
        job.error = f"could not reach the job queue: {exc}"
        job.finished_at = utcnow()
        session.add(job)
        session.commit()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"job queue unavailable: {exc}"
        ) from None
    return job


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic, dependencies=[WriteAccess]
)
def create_job(session: SessionDep, body: JobCreate) -> Job:
    params, queue = validate_job(session, body)
    return submit_job(session, body.kind, params, queue)


@router.get("", response_model=list[JobPublic])
def list_jobs(
    session: SessionDep,
    # Named apart from the imported ``status`` module; clients send ?status=.
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: NameFilter = None,
    parent_id: FilterId = None,
    limit: int = 100,
    offset: Offset = 0,
) -> list[Job]:
    stmt = select(Job)
    if status_filter is not None:
        stmt = stmt.where(Job.status == status_filter)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    if parent_id is not None:
        stmt = stmt.where(Job.parent_id == parent_id)
    return list(session.exec(newest_first(stmt, Job.id, limit, offset)))


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, job_id: PathId) -> Job:
    return get_or_404(session, Job, job_id, "job")


def cancel_job_tree(session: Session, job: Job) -> None:
    """Cancel a job and (for pipelines) its unfinished children."""
    from workers.celery_app import celery_app

    now = utcnow()
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.finished_at = now
        job.stage = "cancelled"
        job.error = "cancelled by request"
        if job.task_id:
            try:
                celery_app.control.revoke(job.task_id)
            except Exception:  # the worker ignores the stale message anyway
                log.debug("revoke of %s failed", job.task_id, exc_info=True)
    elif job.status == JobStatus.running:
        # The worker stops between batches when it sees this flag.
        job.cancel_requested = True
        if job.kind == "pipeline":
            job.status = JobStatus.cancelled
            job.finished_at = now
            job.error = "cancelled by request"
    job.updated_at = now
    session.add(job)
    children = session.exec(select(Job).where(Job.parent_id == job.id)).all()
    for child in children:
        if child.status not in FINAL_STATUSES:
            cancel_job_tree(session, child)


@router.post("/{job_id}/cancel", response_model=JobPublic, dependencies=[WriteAccess])
def cancel_job(session: SessionDep, job_id: PathId) -> Job:
    job = get_job(session, job_id)
    if job.status in FINAL_STATUSES:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job_id} is already {job.status}"
        )
    cancel_job_tree(session, job)
    session.commit()
    session.refresh(job)
    if job.parent_id is not None and job.status == JobStatus.cancelled:
        # A step cancelled on its own stops its pipeline with the reason.
        from workers.orchestrator import child_finished

        child_finished(job.id)  # type: ignore[arg-type]
        session.refresh(job)
    return job


def _pipeline_or_404(session: Session, job_id: int) -> Job:
    job = get_job(session, job_id)
    if job.kind != "pipeline":
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id} is a {job.kind} job, not a pipeline"
        )
    return job


def pipeline_report(session: Session, job: Job) -> dict[str, Any]:
    from workers.orchestrator import build_report

    if job.status == JobStatus.succeeded and (job.metrics or {}).get("variants") is not None:
        report = dict(job.metrics)
    else:
        report = build_report(session, job)
    children = session.exec(select(Job).where(Job.parent_id == job.id).order_by(col(Job.id)))
    report["status"] = job.status
    report["error"] = job.error
    report["steps"] = [
        {
            "job_id": c.id,
            "step": (c.params or {}).get("_step", c.kind),
            "kind": c.kind,
            "status": c.status,
            "output_model_id": c.output_model_id,
            "error": c.error,
        }
        for c in children
    ]
    return report


@router.get("/{job_id}/report")
def get_report(session: SessionDep, job_id: PathId) -> dict[str, Any]:
    """A pipeline's comparison of every variant (JSON)."""
    job = _pipeline_or_404(session, job_id)
    return pipeline_report(session, job)


@router.get("/{job_id}/report.html", response_class=HTMLResponse)
def get_report_html(session: SessionDep, job_id: PathId) -> HTMLResponse:
    """The same comparison as a self-contained page with an accuracy/latency chart."""
    from api.report_html import render_report

    job = _pipeline_or_404(session, job_id)
    return HTMLResponse(render_report(pipeline_report(session, job), str(job.status)))
