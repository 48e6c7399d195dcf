"""The reaper's lost-message sweep, in process: which queued jobs it re-sends or cancels."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from textcls.db import engine_for, migrate
from textcls.models import Job, JobStatus, utcnow
from textcls.settings import get_settings
from workers.broker import job_of_message, queue_keys


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv("TEXTCLS_DATABASE_URL", url)
    monkeypatch.setenv("TEXTCLS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEXTCLS_REQUEUE_LOST_AFTER", "30")
    get_settings.cache_clear()
    migrate(url)
    yield url
    get_settings.cache_clear()


def _job(session: Session, age_s: float, **fields: object) -> int:
    job = Job(kind="evaluate", params={}, queue="cpu", **fields)  # type: ignore[arg-type]
    job.updated_at = utcnow() - timedelta(seconds=age_s)
    session.add(job)
    session.commit()
    assert job.id is not None
    return job.id


def test_resends_lost_cancels_orphaned_steps_leaves_the_rest(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.broker
    import workers.celery_app
    from workers.reaper import requeue_lost_messages

    with Session(engine_for(db)) as s:
        in_broker = _job(s, 120)
        lost = _job(s, 120, attempt=1)
        recent = _job(s, 5)
        parent = _job(s, 300, status=JobStatus.failed)
        orphan = _job(s, 120, parent_id=parent)
        running = _job(s, 120, status=JobStatus.running)
    sent: list[tuple[int, int, str]] = []
    monkeypatch.setattr(workers.broker, "job_messages", lambda _url, _q: {(in_broker, 0)})
    monkeypatch.setattr(
        workers.celery_app,
        "send_job",
        lambda job_id, attempt, queue, task_id=None: sent.append((job_id, attempt, queue)) or "t",
    )
    actions = requeue_lost_messages()
    assert sorted(actions) == sorted([(lost, "resent"), (orphan, "cancelled")])
    assert sent == [(lost, 1, "cpu")]  # same attempt: the claim keeps it to one run
    with Session(engine_for(db)) as s:
        rows = {j: s.get(Job, j) for j in (in_broker, lost, recent, orphan, running)}
        assert rows[lost] is not None and rows[lost].status == JobStatus.queued
        assert "sent again" in (rows[lost].stage or "") and rows[lost].task_id == "t"
        assert rows[orphan] is not None and rows[orphan].status == JobStatus.cancelled
        assert f"pipeline (job {parent}) is already failed" in (rows[orphan].error or "")
        assert rows[in_broker] is not None and rows[in_broker].status == JobStatus.queued
        assert rows[in_broker].stage is None and rows[recent] is not None
        assert rows[recent].stage is None
    # Just re-sent: not again until another requeue_lost_after has passed.
    assert requeue_lost_messages() == []


def test_an_unreadable_broker_changes_nothing(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.broker
    from workers.reaper import requeue_lost_messages

    with Session(engine_for(db)) as s:
        _job(s, 120)

    def down(_url: str, _q: object) -> set[tuple[int, int]]:
        raise ConnectionError("redis is away")

    monkeypatch.setattr(workers.broker, "job_messages", down)
    assert requeue_lost_messages() == []


def test_reads_kombu_messages() -> None:
    body = base64.b64encode(json.dumps([[5, 2], {}, {"chain": None}]).encode()).decode()
    message = {
        "body": body,
        "headers": {"task": "textcls.run_job", "id": "abc", "argsrepr": "[5, 2]"},
        "properties": {"body_encoding": "base64", "delivery_tag": "x"},
    }
    assert job_of_message(message) == (5, 2)
    assert job_of_message({**message, "headers": {"task": "other"}}) is None
    assert queue_keys("cpu") == ["cpu", "cpu\x06\x163", "cpu\x06\x166", "cpu\x06\x169"]
