"""Fixtures for the reliability tests: a tiny servable model, a tiny dataset, own Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.helpers import TINY_TSV, OwnRedis


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained scratch:tiny BERT folder (pytorch format): cheap to load and evaluate."""
    from tests.deploy.helpers import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny") / "model", label=0)


@pytest.fixture(scope="session")
def tiny_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_data") / "tiny.tsv"
    path.write_text(TINY_TSV, encoding="utf-8")
    return path


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis server this test owns (never the shared one on 6379)."""
    server = OwnRedis(tmp_path / "own-redis")
    server.start()
    try:
        yield server
    finally:
        server.close()
