"""Prometheus metrics of the control plane (own registry, like the inference worker's).

- ``textcls_api_requests_total{route,method,status}`` and
  ``textcls_api_request_latency_seconds{route,method}``: every HTTP request, by
  route *template* (``/jobs/{job_id}``, so ids do not explode the label set);
  a path that matches no route is counted under ``route="unmatched"``.
- ``textcls_jobs{kind,status}``: jobs in the database, counted on each scrape
  (one ``GROUP BY`` over the indexed ``status`` column).
- ``textcls_queue_depth{queue}``: messages waiting in each Celery queue (Redis
  ``LLEN`` of the queue's lists, every priority level), and
  ``textcls_queue_unacked``: messages taken by a worker and not yet acknowledged.
- ``textcls_reaper_actions_total{sweep,action}``: what the reaper did
  (``requeued``, ``failed``, ``cancelled``, ``resent``).
- ``textcls_metrics_source_up{source}``: 1 when the database / broker answered
  the scrape's queries, 0 when not (their gauges are then left out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textcls.db import session_scope
from textcls.jobs import KIND_PARAMS
from textcls.models import Job, JobStatus
from textcls.queue import QUEUES, UNACKED_KEY, queue_keys
from textcls.settings import get_settings

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class StateCollector(Collector):
    """Gauges read from the database and the broker when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "textcls_metrics_source_up",
            "1 if the source answered this scrape's queries",
            labels=["source"],
        )
        jobs = self._jobs()
        up.add_metric(["database"], 0.0 if jobs is None else 1.0)
        if jobs is not None:
            yield jobs
        queues = self._queues()
        up.add_metric(["broker"], 0.0 if queues is None else 1.0)
        if queues is not None:
            yield from queues
        yield up

    @staticmethod
    def _jobs() -> GaugeMetricFamily | None:
        family = GaugeMetricFamily(
            "textcls_jobs", "Jobs in the database by kind and status", labels=["kind", "status"]
        )
        try:
            with session_scope() as s:
                stmt = select(Job.kind, Job.status, func.count(col(Job.id))).group_by(
                    col(Job.kind), col(Job.status)
                )
                rows = list(s.exec(stmt))
        except Exception as exc:  # the database may be briefly away
            log.warning("metrics: cannot count jobs: %s", exc)
            return None
        # Every known kind and status is present (0 when none), so a series
        # does not vanish when its last job moves on.
        counts = {(k, str(st)): 0.0 for k in KIND_PARAMS for st in JobStatus}
        counts.update({(str(kind), str(st)): float(n) for kind, st, n in rows})
        for (kind, st), count in sorted(counts.items()):
            family.add_metric([kind, st], count)
        return family

    @staticmethod
    def _queues() -> list[GaugeMetricFamily] | None:
        import redis

        depth = GaugeMetricFamily(
            "textcls_queue_depth", "Job messages waiting in a Celery queue", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "textcls_queue_unacked", "Job messages taken by a worker, not yet acknowledged"
        )
        url = get_settings().resolved_broker_url()
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    for key in queue_keys(queue):
                        pipe.llen(key)
                pipe.hlen(UNACKED_KEY)
                counts = pipe.execute()
        except Exception as exc:
            log.warning("metrics: cannot read the broker's queues: %s", exc)
            return None
        finally:
            client.close()
        per_queue = len(queue_keys(QUEUES[0]))
        for i, queue in enumerate(QUEUES):
            depth.add_metric([queue], float(sum(counts[i * per_queue : (i + 1) * per_queue])))
        unacked.add_metric([], float(counts[-1]))
        return [depth, unacked]


class ControlPlaneMetrics:
    def __init__(self, *, state: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "textcls_api_requests",
            "Control-plane HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "textcls_api_request_latency_seconds",
            "Control-plane request latency (until the response is sent)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reaper_actions = Counter(
            "textcls_reaper_actions",
            "Jobs the reaper requeued, failed, cancelled or sent again",
            ["sweep", "action"],
            registry=self.registry,
        )
        if state:
            self.registry.register(StateCollector())

    def record_sweep(self, sweep: str, actions: object) -> None:
        """Count a reaper sweep's ``(job id, action)`` pairs."""
        if isinstance(actions, list):
            for _job_id, action in actions:
                self.reaper_actions.labels(sweep, str(action)).inc()


def route_label(scope: Scope) -> str:
    """The template of the route that served the request (set by the router)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else UNMATCHED


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template (pure ASGI)."""

    def __init__(self, app: ASGIApp, *, metrics: ControlPlaneMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route, method = route_label(scope), str(scope["method"])
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
