"""Migration 0002 (label names, unlabelled datasets) on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from tests.stack import create_pg_database
from textcls.db import alembic_config, engine_for


@pytest.fixture
def database_url(backend: str, tmp_path: Path, pg_server_url: str) -> str:
    if backend == "postgres":
        return create_pg_database(pg_server_url)
    return f"sqlite:///{tmp_path / 'migrate.db'}"


def _columns(url: str, table: str) -> set[str]:
    engine = engine_for(url)
    engine.dispose()  # a fresh look at the schema
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_0002_adds_label_columns_keeping_rows_and_goes_back(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "0001")
    engine = engine_for(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO datasets (name, rows, num_labels, label_counts, sha256, size_bytes,"
                " path, created_at) VALUES ('old', 3, 2, '{\"0\": 2, \"1\": 1}', 'x', 10,"
                " 'datasets/1.tsv', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO models (name, format, size_bytes, num_labels, info, path,"
                " created_at) VALUES ('m', 'pytorch', 5, 2, '{}', 'models/1', CURRENT_TIMESTAMP)"
            )
        )
    command.upgrade(cfg, "head")
    assert {"label_names", "labelled"} <= _columns(database_url, "datasets")
    assert "label_names" in _columns(database_url, "models")
    with engine.connect() as conn:
        labelled, names = conn.execute(text("SELECT labelled, label_names FROM datasets")).one()
        assert bool(labelled) is True and names is None  # an old row keeps its meaning
        assert conn.execute(text("SELECT label_names FROM models")).scalar_one() is None
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO datasets (name, rows, num_labels, label_counts, sha256, size_bytes,"
                " path, created_at, label_names, labelled) VALUES ('new', 1, 2, '{}', 'y', 5,"
                " 'datasets/2.tsv', CURRENT_TIMESTAMP, '[\"neg\", \"pos\"]', false)"
            )
        )
    command.downgrade(cfg, "0001")
    assert not {"label_names", "labelled"} & _columns(database_url, "datasets")
    assert "label_names" not in _columns(database_url, "models")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM datasets")).scalar_one() == 2
    command.upgrade(cfg, "head")
    assert {"label_names", "labelled"} <= _columns(database_url, "datasets")
