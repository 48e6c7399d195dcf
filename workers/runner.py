"""Running one job: claim it, beat, report progress, record the outcome.

Everything here takes a job id and opens its own sessions, so a task can be
delivered again (after a worker died, or a visibility timeout) without harm:
only the message whose ``attempt`` matches the job's current attempt, while
the job is ``queued``, may start it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from pipeline.common import JobCancelled, StepError
from pipeline.runtime import torch_threads
from textcls import lifecycle
from textcls.db import retry_db, session_scope
from textcls.jobs import JobParams, parse_params, user_params
from textcls.models import Dataset, Job, JobStatus, Model
from textcls.records import add_model
from textcls.settings import get_settings
from textcls.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class NewModel:
    """A model folder produced by a job, to be registered when the job succeeds."""

    folder: Path
    format: str
    num_labels: int
    name: str
    parent_id: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    metrics: dict[str, Any] = field(default_factory=dict)
    model: NewModel | None = None
    # Called with (session, job, registered model or None) inside the final
    # transaction, for extra rows such as evaluations.
    on_success: Callable[[Session, Job, Model | None], None] | None = None
    # The job stays running after the handler returns (a pipeline parent,
    # finished later by its children).
    detach: bool = False


class JobContext:
    """What a handler sees: typed params, paths of inputs, progress and staging."""

    def __init__(
        self,
        job: Job,
        params: JobParams,
        store: ArtifactStore,
        beat: Heartbeat,
        *,
        threads: int | None = None,
    ) -> None:
        assert job.id is not None
        self.job_id: int = job.id
        # CPU threads for the job's models (TEXTCLS_WORKER_THREADS; torch's are
        # already set around the handler, ONNX Runtime sessions take it).
        self.threads = threads
        self.kind = job.kind
        self.params = params
        self.store = store
        self._beat = beat
        self._last_write = 0.0
        self.staging_dir = store.tmp_dir()

    def dataset(self, dataset_id: int) -> tuple[Dataset, Path]:
        with session_scope() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise StepError(f"dataset {dataset_id} does not exist")
            return row, self.store.resolve(row.path)

    def model(self, model_id: int) -> tuple[Model, Path]:
        with session_scope() as s:
            row = s.get(Model, model_id)
            if row is None:
                raise StepError(f"model {model_id} does not exist")
            return row, self.store.resolve(row.path)

    def progress(self, fraction: float, stage: str | None = None) -> None:
        """Record progress (throttled) and stop between batches when cancelled."""
        if self._beat.cancelled.is_set():
            raise JobCancelled("cancelled by request")
        now = time.monotonic()
        if now - self._last_write < 1.0 and fraction < 1.0:
            return
        self._last_write = now
        values: dict[str, Any] = {"progress": max(0.0, min(1.0, float(fraction)))}
        if stage is not None:
            values["stage"] = stage[:200]
        try:
            self._beat.update(values)
        except (OperationalError, InterfaceError) as exc:  # best effort: the work goes on
            log.warning("job %s: could not record progress: %s", self.job_id, exc)

    def out_dir(self, name: str = "model") -> Path:
        path = self.staging_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class Heartbeat:
    """A thread that marks the job alive and notices cancel requests."""

    def __init__(self, job_id: int, attempt: int, interval: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.interval = interval
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def update(self, values: dict[str, Any]) -> None:
        """Record ``values`` (progress, stage) if this attempt still owns the job."""
        result = lifecycle.beat(self.job_id, self.attempt, **values)
        if not result.owned:
            # Reaped, or the row changed hands: stop working on it.
            self.lost.set()
        if result.cancel_requested:
            self.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.update({})
            except Exception:  # the database may be briefly away; keep beating
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


Handler = Callable[[JobContext], Outcome]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


def _register(ctx: JobContext, job_id: int, attempt: int, outcome: Outcome) -> bool:
    """Register the model (folder moved into place) and mark the job succeeded, atomically."""
    store = ctx.store
    placed: list[str] = []

    def record(s: Session, job: Job) -> int | None:
        model: Model | None = None
        if outcome.model is not None:
            nm = outcome.model
            model = add_model(
                s,
                store,
                nm.folder,
                name=nm.name,
                format=nm.format,
                num_labels=nm.num_labels,
                parent_id=nm.parent_id,
                job_id=job_id,
                info=nm.info,
            )
            placed.append(model.path)
        if outcome.on_success is not None:
            outcome.on_success(s, job, model)
        return model.id if model is not None else None

    def replay(s: Session, job: Job) -> None:
        # An earlier try's commit reached the database although the client saw
        # an error: put the model folder in place again and be done.
        if outcome.model is not None and job.output_model_id is not None:
            model_row = s.get(Model, job.output_model_id)
            if model_row is not None and outcome.model.folder.exists():
                store.commit(outcome.model.folder, model_row.path)

    def undo() -> None:
        if placed and outcome.model is not None:
            _unplace(store, placed[0], outcome.model.folder)

    return lifecycle.succeed(job_id, attempt, outcome.metrics, record, replay=replay, undo=undo)


def _unplace(store: ArtifactStore, relpath: str, staged: Path) -> None:
    """Move a folder placed for an uncommitted row back to staging (a retry can use it)."""
    try:
        os.replace(store.resolve(relpath), staged)
    except OSError:
        log.warning("could not move %s back to %s; removing it", relpath, staged, exc_info=True)
        store.remove(relpath)


def execute_job(job_id: int, attempt: int, worker: str = "worker") -> str:
    """Run one job to a final state; returns what happened (for logs and tests)."""
    settings = get_settings()
    job = lifecycle.claim(job_id, attempt, worker)
    if job is None:
        log.info(
            "job %s attempt %s: not queued for this attempt, skipping message", job_id, attempt
        )
        return "skipped"
    log.info("job %s (%s) attempt %s started on %s", job_id, job.kind, attempt, worker)
    store = ArtifactStore(settings.resolved_artifact_dir())
    with Heartbeat(job_id, attempt, settings.heartbeat_interval) as beat:
        ctx: JobContext | None = None
        try:
            params = parse_params(job.kind, user_params(job.params))
            fn = HANDLERS.get(job.kind)
            if fn is None:
                raise StepError(f"no handler for job kind {job.kind!r}")
            threads = settings.worker_threads or None
            ctx = JobContext(job, params, store, beat, threads=threads)
            with torch_threads(threads):
                outcome = fn(ctx)
            if beat.lost.is_set():
                return "lost"
            if outcome.detach:
                return "detached"
            if retry_db(lambda: _register(ctx, job_id, attempt, outcome), f"job {job_id}"):
                log.info("job %s succeeded", job_id)
                return "succeeded"
            return "lost"
        except JobCancelled:
            if beat.lost.is_set():
                return "lost"
            retry_db(
                lambda: lifecycle.finish(
                    job_id, attempt, JobStatus.cancelled, lifecycle.CANCELLED_BY_REQUEST
                ),
                f"job {job_id}",
            )
            log.info("job %s cancelled", job_id)
            return "cancelled"
        except StepError as exc:
            message = str(exc)
            retry_db(
                lambda: lifecycle.finish(job_id, attempt, JobStatus.failed, message),
                f"job {job_id}",
            )
            log.warning("job %s failed: %s", job_id, exc)
            return "failed"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"[:20000]
            retry_db(
                lambda: lifecycle.finish(job_id, attempt, JobStatus.failed, error),
                f"job {job_id}",
            )
            log.exception("job %s crashed", job_id)
            return "failed"
        finally:
            if ctx is not None:
                store.remove(str(ctx.staging_dir.relative_to(store.root)))
