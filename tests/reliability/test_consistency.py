"""``check_consistency`` and ``textcls check`` on a hand-made store, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from textcls.consistency import check_consistency
from textcls.db import engine_for, migrate
from textcls.models import Dataset, Job, JobStatus, Model
from textcls.settings import get_settings
from textcls.store import ArtifactStore


def _store(tmp_path: Path) -> tuple[Session, ArtifactStore]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    store = ArtifactStore(tmp_path / "artifacts")
    session = Session(engine_for(url))
    (store.root / "datasets").mkdir(parents=True)
    (store.root / "datasets" / "1.tsv").write_bytes(b"12345")
    session.add(
        Dataset(name="d", rows=1, num_labels=2, sha256="x", size_bytes=5, path="datasets/1.tsv")
    )
    job = Job(kind="train", status=JobStatus.succeeded, output_model_id=1)
    session.add(job)
    session.flush()
    (store.root / "models" / "1").mkdir(parents=True)
    (store.root / "models" / "1" / "w.safetensors").write_bytes(b"abc")
    session.add(
        Model(name="m", format="pytorch", size_bytes=3, num_labels=2, path="models/1", job_id=1)
    )
    session.commit()
    (store.root / "tmp" / "work-in-progress").mkdir(parents=True)
    return session, store


def test_a_consistent_store_has_no_problems(tmp_path: Path) -> None:
    session, store = _store(tmp_path)
    assert check_consistency(session, store) == []


def test_every_kind_of_disagreement_is_named(tmp_path: Path) -> None:
    session, store = _store(tmp_path)
    (store.root / "datasets" / "1.tsv").unlink()
    (store.root / "models" / "1" / "w.safetensors").write_bytes(b"abcdef")
    (store.root / "models" / "7").mkdir()  # a half-written folder no row names
    job = session.get(Job, 1)
    assert job is not None
    job.status = JobStatus.failed
    session.add(Job(kind="export", status=JobStatus.succeeded, output_model_id=99))
    session.commit()
    problems = "\n".join(check_consistency(session, store))
    assert "dataset 1: file 'datasets/1.tsv' is missing" in problems
    assert "model 1: folder 'models/1' has 6 bytes, the row says 3" in problems
    assert "model 1: registered by job 1, which is failed" in problems
    assert "job 2: output model 99 does not exist" in problems
    assert "orphan folder 'models/7'" in problems
    assert "tmp" not in problems


def test_cli_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.cli import app

    session, store = _store(tmp_path)
    session.close()
    monkeypatch.setenv("TEXTCLS_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("TEXTCLS_ARTIFACT_DIR", str(store.root))
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(app, ["check"])
        assert ok.exit_code == 0 and "consistent" in ok.output, ok.output
        (store.root / "models" / "8").mkdir()
        bad = CliRunner().invoke(app, ["check"])
        assert bad.exit_code == 1 and "orphan folder 'models/8'" in bad.output, bad.output
    finally:
        get_settings.cache_clear()
