"""Per-job logs in the artifact store (``logs/<job id>.log``).

:class:`JobLog` is a :class:`logging.Handler` the job runner attaches to the
root logger while a job runs: it keeps the records of the threads it follows
(the job's own thread, its heartbeat thread ``heartbeat-<id>``) and appends them, formatted, to the
job's log in whole lines, at least every ``flush_interval`` seconds and at
once for warnings and errors, so the log is readable while the job runs and
stays after its worker is gone. With an object store the log is written here
and uploaded whole every ``TEXTCLS_LOG_UPLOAD_SECONDS`` and when the job ends
(a retry on another host continues from the uploaded copy). A log stops
growing at ``max_bytes`` with one line that says so.

:func:`note` adds one event to a job's log from outside its run (a pipeline
parent's log lists its steps' events, written by the lifecycle wherever a
step ends; with an object store it reads the log, adds the line and writes it
back, so two hosts adding to one log at the same instant can lose a line).
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from textcls.models import utcnow
from textcls.store import ArtifactStore

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobLog(logging.Handler):
    """Copies the followed threads' log records into one job's log in the store."""

    def __init__(
        self,
        store: ArtifactStore,
        job_id: int,
        *,
        max_bytes: int,
        flush_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.store = store
        self.job_id = job_id
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._threads = {threading.get_ident()}
        # The runner's heartbeat thread for this job (workers.runner.Heartbeat's name).
        self._heartbeat = f"heartbeat-{job_id}"
        self._buffer: list[str] = []
        self._written = store.open_log(job_id)
        self._truncated = False
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"joblog-{job_id}", daemon=True
        )

    # ------------------------------------------------------------------ attach / detach
    def __enter__(self) -> JobLog:
        _active.append(self)
        logging.getLogger().addHandler(self)
        self._flusher.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        logging.getLogger().removeHandler(self)
        self._stop.set()
        self._flusher.join(timeout=5)
        self.flush()
        _active.remove(self)
        try:
            self.store.flush_log(self.job_id)  # the whole log, to an object store
        except Exception as exc:  # never let logging break the job
            log.warning("could not upload the log of job %s: %s", self.job_id, exc)

    def active_here(self, job_id: int) -> bool:
        """Whether this thread's records already go into ``job_id``'s log."""
        return job_id == self.job_id and threading.get_ident() in self._threads

    # ------------------------------------------------------------------ logging.Handler
    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.thread in self._threads or record.threadName == self._heartbeat
        return ours and bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        # handle() holds self.lock around emit(); flush() takes it too.
        try:
            self._buffer.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._write()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    # ------------------------------------------------------------------ writing
    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def _write(self) -> None:
        """Append the buffered lines (caller holds the lock), up to ``max_bytes`` in all."""
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        if self._truncated:
            return
        room = self.max_bytes - self._written
        if len(text.encode("utf-8", "replace")) > room:
            kept = text.encode("utf-8", "replace")[: max(0, room)]
            text = kept[: kept.rfind(b"\n") + 1].decode("utf-8", "replace")
            text += f"... log truncated at {self.max_bytes} bytes (TEXTCLS_JOB_LOG_MAX_BYTES)\n"
            self._truncated = True
        try:
            self.store.append_log(self.job_id, text)
        except OSError as exc:  # never let logging break the job
            log.debug("could not write the log of job %s: %s", self.job_id, exc)
            return
        self._written += len(text.encode("utf-8", "replace"))


# The captures running in this process, so note() does not write a record twice.
_active: list[JobLog] = []


def note(
    store: ArtifactStore,
    job_id: int,
    message: str,
    *,
    level: int = logging.INFO,
    logger: logging.Logger = log,
) -> None:
    """Log ``job <id>: message`` on ``logger`` and make sure it is in that job's log.

    Inside the job's own run the record is captured already (if the logger lets
    it through); otherwise the line is appended to the log directly (best
    effort: a failure is logged).
    """
    logger.log(level, "job %s: %s", job_id, message)
    if logger.isEnabledFor(level) and any(h.active_here(job_id) for h in _active):
        return  # the record above went into this job's log
    stamp = utcnow().astimezone().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    line = f"{stamp} {logging.getLevelName(level)} {logger.name}: job {job_id}: {message}\n"
    try:
        store.add_log_lines(job_id, line)
    except Exception as exc:  # best effort: a file or an object store may fail
        log.warning("could not add to the log of job %s: %s", job_id, exc)
