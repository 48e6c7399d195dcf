"""The reaper's lost-message sweep against a real Redis: which queued jobs it re-sends."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from launch.procs import free_port
from textcls.db import engine_for, migrate
from textcls.models import Job, JobStatus, utcnow
from textcls.queue import job_messages, job_of_message, queue_keys

REPO = Path(__file__).resolve().parents[2]
_broker_db = 13  # a Redis database number no other test's workers consume


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """A fresh SQLite database and a real, empty Redis database for the sweep."""
    import redis

    broker = f"{redis_url.rsplit('/', 1)[0]}/{_broker_db}"
    redis.Redis.from_url(broker).flushdb()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    return {
        **os.environ,
        "TEXTCLS_DATABASE_URL": url,
        "TEXTCLS_DATA_DIR": str(tmp_path),
        "TEXTCLS_BROKER_URL": broker,
        "TEXTCLS_REQUEUE_LOST_AFTER": "30",
        "PYTHONPATH": str(REPO),
    }


def _in_process(env: dict[str, str], code: str) -> object:
    """Run code in a fresh process configured by ``env`` (the Celery app reads its
    broker at import); the code's last line binds ``out``, printed as JSON."""
    script = f"import json\n{code}\nprint(json.dumps(out))"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _job(url: str, age_s: float, **fields: object) -> int:
    with Session(engine_for(url)) as session:
        job = Job(kind="evaluate", params={}, queue="cpu", **fields)  # type: ignore[arg-type]
        job.updated_at = utcnow() - timedelta(seconds=age_s)
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


SWEEP = "from textcls.lifecycle import resend_lost_messages\nout = resend_lost_messages()"


def test_resends_lost_cancels_orphaned_steps_leaves_the_rest(env: dict[str, str]) -> None:
    url = env["TEXTCLS_DATABASE_URL"]
    in_broker = _job(url, 120)
    lost = _job(url, 120, attempt=1)
    recent = _job(url, 5)
    parent = _job(url, 300, status=JobStatus.failed)
    orphan = _job(url, 120, parent_id=parent)
    running = _job(url, 120, status=JobStatus.running)
    # A real message for one job; the others' messages are "lost".
    _in_process(env, f"from textcls.queue import send_job\nout = send_job({in_broker}, 0, 'cpu')")
    assert job_messages(env["TEXTCLS_BROKER_URL"], ["cpu"]) == {(in_broker, 0)}

    actions = _in_process(env, SWEEP)
    assert sorted(map(tuple, actions)) == sorted([(lost, "resent"), (orphan, "cancelled")])
    # Sent again under the same attempt: the claim keeps it to one run.
    assert job_messages(env["TEXTCLS_BROKER_URL"], ["cpu"]) == {(in_broker, 0), (lost, 1)}
    with Session(engine_for(url)) as s:
        rows = {j: s.get(Job, j) for j in (in_broker, lost, recent, orphan, running)}
        assert rows[lost] is not None and rows[lost].status == JobStatus.queued
        assert "sent again" in (rows[lost].stage or "") and rows[lost].task_id
        assert rows[orphan] is not None and rows[orphan].status == JobStatus.cancelled
        assert f"pipeline (job {parent}) is already failed" in (rows[orphan].error or "")
        assert rows[in_broker] is not None and rows[in_broker].status == JobStatus.queued
        assert rows[in_broker].stage is None and rows[recent] is not None
        assert rows[recent].stage is None
        assert rows[running] is not None and rows[running].status == JobStatus.running
    # Just re-sent: not again until another requeue_lost_after has passed.
    assert _in_process(env, SWEEP) == []


def test_an_unreadable_broker_changes_nothing(env: dict[str, str]) -> None:
    url = env["TEXTCLS_DATABASE_URL"]
    job_id = _job(url, 120)
    # Nothing listens on this port: the broker really cannot be read.
    down = {**env, "TEXTCLS_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert _in_process(down, SWEEP) == []
    with Session(engine_for(url)) as s:
        row = s.get(Job, job_id)
        assert row is not None and row.status == JobStatus.queued and row.stage is None


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
