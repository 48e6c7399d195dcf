"""The control plane: a FastAPI app over the database and the job queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from botocore.exceptions import ConnectionError as StoreConnectionError
from botocore.exceptions import HTTPClientError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import InterfaceError, OperationalError

from api import console
from api.limits import BodyLimitMiddleware
from api.metrics import ControlPlaneMetrics, RequestMetricsMiddleware
from api.routers import datasets, deployments, inference, joblogs, jobs, models, retention
from textcls import __version__, lifecycle
from textcls.db import SingletonLock
from textcls.settings import get_settings

log = logging.getLogger(__name__)


class Reaper:
    """Background thread running the lifecycle's sweeps: requeue or fail jobs whose
    worker went silent, send again the messages of queued jobs the broker lost,
    and advance pipelines stalled with every step final.

    With several API processes on one database, only the one holding the
    ``reaper`` :class:`~textcls.db.SingletonLock` sweeps; another takes over
    within a sweep interval of its death.
    """

    def __init__(self, interval: float, metrics: ControlPlaneMetrics | None = None) -> None:
        self.interval = interval
        self.metrics = metrics
        self.lock = SingletonLock("reaper")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.lock.release()

    def _run(self) -> None:
        # Looking for lost messages reads the broker's queues: not every sweep.
        lost_every = max(self.interval, get_settings().requeue_lost_after / 2)
        next_lost = time.monotonic() + lost_every
        while not self._stop.wait(self.interval):
            if not self.lock.held():
                continue  # another API process sweeps
            sweeps: list[Callable[[], object]] = [
                lifecycle.requeue_stale_jobs,
                lifecycle.advance_stalled_pipelines,
            ]
            if time.monotonic() >= next_lost:
                sweeps.append(lifecycle.resend_lost_messages)
                next_lost = time.monotonic() + lost_every
            for sweep in sweeps:
                try:
                    actions = sweep()
                    if self.metrics is not None:
                        self.metrics.record_sweep(sweep.__name__, actions)
                except Exception:  # the database may be briefly away
                    log.warning("reaper sweep %s failed", sweep.__name__, exc_info=True)


def create_app(*, reaper: bool = True) -> FastAPI:
    settings = get_settings()
    metrics = ControlPlaneMetrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = Reaper(settings.reaper_interval, metrics) if reaper else None
        if sweeper is not None:
            sweeper.start()
        yield
        if sweeper is not None:
            sweeper.stop()

    app = FastAPI(
        title="textcls control plane",
        version=__version__,
        description="Datasets, jobs (train, prune, distill, export, fp16, quantize, "
        "evaluate, pipeline), models and deployments.",
        lifespan=lifespan,
    )
    # Oversized bodies are refused before they are read (413).
    app.add_middleware(
        BodyLimitMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    # Outermost, so refusals (413) and errors are counted too.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(joblogs.router)
    app.include_router(models.router)
    app.include_router(deployments.router)
    app.include_router(retention.router)
    app.include_router(inference.router)
    app.include_router(console.router)

    # Connection-level database errors only: a bad statement or a constraint
    # violation is a bug, not an outage, and must not read "try again shortly".
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", exc)
        return JSONResponse(
            status_code=503,
            content={"detail": "database unavailable, try again shortly"},
            headers={"Retry-After": "5"},
        )

    # The object store unreachable (connection refused, timed out, cut): an
    # outage too. Its refusals and missing keys or bucket stay errors.
    @app.exception_handler(StoreConnectionError)
    @app.exception_handler(HTTPClientError)
    async def _store_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("artifact store error: %s", exc)
        return JSONResponse(
            status_code=503,
            content={"detail": "artifact store unavailable, try again shortly"},
            headers={"Retry-After": "5"},
        )

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["meta"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: requests, latency, jobs by kind and status, queue depth,
        reaper actions (see ``api/metrics.py``)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory api.main:app_factory``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app()
