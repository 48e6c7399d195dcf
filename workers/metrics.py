"""Prometheus metrics of a job worker process (own registry, like the inference worker's).

Celery's prefork pool runs jobs in child processes, so each child serves its
own metrics: ``start_http_server`` on ``TEXTCLS_WORKER_METRICS_PORT`` plus the
child's pool index (``--concurrency 1``, the default, serves exactly that
port; ``--concurrency 3`` serves that port and the next two). 0 turns it off.
It is started by the ``worker_process_init`` signal (:mod:`workers.tasks`).

- ``textcls_worker_jobs_started_total{kind}``
- ``textcls_worker_jobs_finished_total{kind,outcome}``: ``succeeded``,
  ``failed``, ``cancelled``, ``lost`` (reaped or taken over), ``detached``
  (a pipeline parent, finished later by its steps), ``crashed`` (the runner
  itself raised)
- ``textcls_worker_jobs_failed_total{kind}``
- ``textcls_worker_job_duration_seconds{kind,outcome}``: claim to end
- ``textcls_worker_step_duration_seconds{step}``: the same, for a pipeline's
  steps (``train``, ``prune``, ``distill``, ``export``, ``fp16``, ``quantize``,
  and ``evaluate``)
- ``textcls_worker_running_jobs``: jobs this process is running (0 or 1)
- ``textcls_worker_heartbeat_age_seconds``: seconds since the running job's
  last heartbeat reached the database (0 when no job runs); it grows past
  ``TEXTCLS_HEARTBEAT_INTERVAL`` when beats fail, and the reaper gives the job
  up at ``TEXTCLS_HEARTBEAT_TIMEOUT``
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from textcls.settings import get_settings

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


@dataclass
class JobRecord:
    """The outcome of one job, set by the runner before the ``track`` block ends."""

    outcome: str = "crashed"


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = Counter(
            "textcls_worker_jobs_started",
            "Jobs this worker process claimed and started, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.finished = Counter(
            "textcls_worker_jobs_finished",
            "Jobs that ended on this worker process, by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.failed = Counter(
            "textcls_worker_jobs_failed",
            "Jobs that failed on this worker process, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "textcls_worker_job_duration_seconds",
            "Job run time on this worker, claim to end, by kind and outcome",
            ["kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.step_duration = Histogram(
            "textcls_worker_step_duration_seconds",
            "Run time of a pipeline's steps, by step",
            ["step"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "textcls_worker_running_jobs", "Jobs this process is running", registry=self.registry
        )
        self.heartbeat_age = Gauge(
            "textcls_worker_heartbeat_age_seconds",
            "Seconds since the running job's last heartbeat was recorded (0: no job)",
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._last_beat: float | None = None
        self.heartbeat_age.set_function(self._beat_age)
        self.port: int | None = None

    def _beat_age(self) -> float:
        with self._lock:
            last = self._last_beat
        return 0.0 if last is None else time.monotonic() - last

    def beat(self) -> None:
        """The running job's heartbeat reached the database."""
        with self._lock:
            if self._last_beat is not None:
                self._last_beat = time.monotonic()

    @contextmanager
    def track(self, kind: str, step: str | None) -> Iterator[JobRecord]:
        """Count and time one claimed job; the caller sets ``record.outcome``."""
        record = JobRecord()
        started = time.monotonic()
        self.started.labels(kind).inc()
        self.running.inc()
        with self._lock:
            self._last_beat = started  # the claim itself is the first beat
        try:
            yield record
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self._last_beat = None
            self.running.dec()
            self.finished.labels(kind, record.outcome).inc()
            if record.outcome in ("failed", "crashed"):
                self.failed.labels(kind).inc()
            if record.outcome != "detached":
                self.duration.labels(kind, record.outcome).observe(elapsed)
                if step is not None:
                    self.step_duration.labels(step).observe(elapsed)

    def serve(self, base_port: int, index: int, host: str) -> int | None:
        """Serve ``/metrics`` on ``base_port + index``; None when off (port 0) or taken."""
        if base_port <= 0:
            return None
        port = base_port + index
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("worker metrics: cannot listen on %s:%s: %s", host, port, exc)
            return None
        self.port = port
        log.info("worker metrics on http://%s:%s/metrics", host, port)
        return port


METRICS = WorkerMetrics()


def serve_for_pool_process() -> int | None:
    """Start this pool process's metrics server (called in each prefork child)."""
    from billiard.process import current_process

    settings = get_settings()
    index = int(getattr(current_process(), "index", 0) or 0)
    return METRICS.serve(settings.worker_metrics_port, index, settings.worker_metrics_host)
