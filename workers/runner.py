"""Running one job: claim it, beat, report progress, record the outcome.

Everything here takes a job id and opens its own sessions, so a task can be
delivered again (after a worker died, or a visibility timeout) without harm:
only the message whose ``attempt`` matches the job's current attempt, while
the job is ``queued``, may start it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from pipeline.common import JobCancelled, StepError
from pipeline.runtime import torch_threads
from textcls import lifecycle
from textcls.db import retry_db, session_scope
from textcls.joblog import JobLog
from textcls.jobs import JobParams, parse_params, user_params
from textcls.models import Dataset, Job, JobStatus, Model
from textcls.pipelines import step_of
from textcls.records import add_model
from textcls.settings import get_settings
from textcls.store import ArtifactStore
from workers.isolate import run_killable
from workers.metrics import METRICS

if TYPE_CHECKING:  # torch comes with it: imported when a training step runs
    from pipeline.checkpoint import Checkpointer

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a running job looks for a cancel request (between its beats).
CANCEL_POLL_SECONDS = 1.0


@dataclass
class NewModel:
    """A model folder produced by a job, to be registered when the job succeeds."""

    folder: Path
    format: str
    num_labels: int
    name: str
    parent_id: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None


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
        self._last_stage: str | None = None
        # Named after the job, so `textcls gc` leaves a running job's folder alone.
        self.staging_dir = store.tmp_dir(owner=f"job-{job.id}")
        # The inputs it read, held in this host's cache until the job ends.
        self.holds = contextlib.ExitStack()

    def dataset(self, dataset_id: int) -> tuple[Dataset, Path]:
        with session_scope() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise StepError(f"dataset {dataset_id} does not exist")
            return row, self._input(row.path)

    def model(self, model_id: int) -> tuple[Model, Path]:
        with session_scope() as s:
            row = s.get(Model, model_id)
            if row is None:
                raise StepError(f"model {model_id} does not exist")
            return row, self._input(row.path)

    def _input(self, relpath: str) -> Path:
        """An input artifact's local path (fetched into the cache and held there)."""
        self.holds.enter_context(self.store.hold(relpath))
        return self.store.resolve(relpath)

    def progress(self, fraction: float, stage: str | None = None) -> None:
        """Record progress (throttled; a new stage always) and stop when cancelled."""
        if self._beat.cancelled.is_set():
            raise JobCancelled("cancelled by request")
        now = time.monotonic()
        new_stage = stage is not None and stage != self._last_stage
        if now - self._last_write < 1.0 and fraction < 1.0 and not new_stage:
            return
        self._last_write = now
        self._last_stage = stage if stage is not None else self._last_stage
        values: dict[str, Any] = {"progress": max(0.0, min(1.0, float(fraction)))}
        if stage is not None:
            values["stage"] = stage[:200]
        try:
            self._beat.update(values)
        except (OperationalError, InterfaceError) as exc:  # best effort: the work goes on
            log.warning("job %s: could not record progress: %s", self.job_id, exc)

    def run_killable(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a step function that reports no progress for long in a child process.

        ``fn(*args, **kwargs, progress=…)`` runs in the child; its progress
        comes back to :meth:`progress`, and a cancel kills it at once
        (:func:`workers.isolate.run_killable`).
        """
        return run_killable(
            fn,
            *args,
            progress=self.progress,
            cancelled=self._beat.cancelled,
            step_threads=self.threads,
            **kwargs,
        )

    def checkpointer(self) -> Checkpointer:
        """Where a training step saves its resumable state (kept across attempts)."""
        from pipeline.checkpoint import Checkpointer

        minutes = get_settings().checkpoint_minutes
        folder = self.store.checkpoint_dir(self.job_id)  # an earlier attempt's, wherever it ran
        return Checkpointer(
            folder,
            every_seconds=minutes * 60,
            on_save=CheckpointUpload(self.job_id),
        )

    def out_dir(self, name: str = "model") -> Path:
        path = self.staging_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class CheckpointUpload:
    """Uploads a saved checkpoint to the job's store (object store only).

    A plain picklable value, not a closure: training steps run in a child
    process (:func:`workers.isolate.run_killable`) that opens the settings'
    store anew (the worker's own, from the same environment).
    """

    job_id: int

    def __call__(self, path: Path) -> None:
        ArtifactStore().save_checkpoint_file(self.job_id, path)


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
        METRICS.beat()
        if not result.owned:
            # Reaped, or the row changed hands: stop working on it.
            self.lost.set()
        if result.cancel_requested:
            self.cancelled.set()

    def _run(self) -> None:
        # Cancel requests are read more often than the job beats, so a cancel
        # takes effect within about a second whatever the beat interval.
        poll = min(self.interval, CANCEL_POLL_SECONDS)
        next_beat = time.monotonic() + self.interval
        while not self._stop.wait(poll):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    self.update({})
                elif lifecycle.cancel_requested(self.job_id):
                    self.cancelled.set()
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
                label_names=nm.label_names,
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
        store.unplace(relpath, staged)
    except Exception:
        log.warning("could not move %s back to %s; removing it", relpath, staged, exc_info=True)
        store.remove(relpath)


def execute_job(job_id: int, attempt: int, worker: str = "worker") -> str:
    """Run one job to a final state; returns what happened (for logs and tests)."""
    job = lifecycle.claim(job_id, attempt, worker)
    if job is None:
        log.info(
            "job %s attempt %s: not queued for this attempt, skipping message", job_id, attempt
        )
        return "skipped"
    # The job's log records (this thread's and its heartbeat's) go to logs/<id>.log.
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
    with JobLog(store, job_id, max_bytes=settings.job_log_max_bytes):
        log.info("job %s (%s) attempt %s started on %s", job_id, job.kind, attempt, worker)
        step = step_of(job) if job.parent_id is not None else None
        with METRICS.track(job.kind, step) as record:
            record.outcome = _run_claimed(job, attempt)
    return record.outcome


def _run_claimed(job: Job, attempt: int) -> str:
    """Run a job this attempt has claimed; returns what happened."""
    assert job.id is not None
    job_id = job.id
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
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
            _discard_staging(ctx, store)
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
            _discard_staging(ctx, store)
            retry_db(
                lambda: lifecycle.finish(job_id, attempt, JobStatus.failed, message),
                f"job {job_id}",
            )
            log.warning("job %s failed: %s", job_id, exc)
            return "failed"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"[:20000]
            _discard_staging(ctx, store)
            retry_db(
                lambda: lifecycle.finish(job_id, attempt, JobStatus.failed, error),
                f"job {job_id}",
            )
            log.exception("job %s crashed", job_id)
            return "failed"
        finally:
            if ctx is not None:
                ctx.holds.close()
                store.remove(str(ctx.staging_dir.relative_to(store.root)))


def _discard_staging(ctx: JobContext | None, store: ArtifactStore) -> None:
    """Remove a job's staging folder before its final state is written.

    So a job seen cancelled or failed has left nothing behind (the ``finally``
    that removes it again afterwards is then a no-op).
    """
    if ctx is not None:
        store.remove(str(ctx.staging_dir.relative_to(store.root)))
