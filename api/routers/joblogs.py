"""``GET /jobs/{id}/logs``: a job's log, kept in the artifact store by its worker."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import PathId, SessionDep, SettingsDep, get_or_404
from textcls.models import Job
from textcls.store import ArtifactStore

router = APIRouter(tags=["jobs"])

MAX_TAIL = 100_000
# Offsets are byte positions in one log file (capped by TEXTCLS_JOB_LOG_MAX_BYTES).
MAX_OFFSET = 2**53


@router.get(
    "/jobs/{job_id}/logs",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "whole log lines (empty before the job has logged anything); "
            "header X-Log-Offset: the byte offset to read on from (?offset=) to follow it; "
            "X-Job-Status: the job's status",
        },
        404: {"description": "unknown job"},
        422: {"description": "tail or offset out of range"},
    },
)
def get_job_logs(
    session: SessionDep,
    settings: SettingsDep,
    job_id: PathId,
    tail: Annotated[
        int | None, Query(ge=1, le=MAX_TAIL, description="only the last N lines")
    ] = None,
    offset: Annotated[
        int, Query(ge=0, le=MAX_OFFSET, description="start at this byte (X-Log-Offset)")
    ] = 0,
) -> Response:
    """The job's log records (the runner's and its step's), while it runs and after.

    With ``tail`` only the last N lines (of those from ``offset`` on).
    """
    job = get_or_404(session, Job, job_id, "job")
    chunk = ArtifactStore.from_settings(settings).read_log(job_id, offset=offset, tail=tail)
    return Response(
        chunk.data,
        media_type="text/plain; charset=utf-8",
        headers={"X-Log-Offset": str(chunk.end), "X-Job-Status": str(job.status)},
    )
