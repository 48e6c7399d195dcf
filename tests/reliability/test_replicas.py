"""Several API processes on one database: one reaper sweeps, and a job is requeued once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.procs import Proc, free_port, wait_for
from launch.services import api_command
from tests.deploy.helpers import register_model
from tests.reliability.helpers import consistency_problems, job_starts
from tests.stack import Stack, create_pg_database
from textcls.db import SingletonLock

TAKEN = "reaper lock taken by this process"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_singleton_lock_is_held_by_one_holder_at_a_time(
    kind: str, tmp_path: Path, pg_server_url: str
) -> None:
    url = create_pg_database(pg_server_url) if kind == "postgres" else f"sqlite:///{tmp_path}/x.db"
    a, b = SingletonLock("t", url), SingletonLock("t", url)
    try:
        assert a.held() and a.held()
        assert not b.held()
        a.release()
        assert b.held() and not a.held()
    finally:
        a.release()
        b.release()


def _start_api(stack: Stack, name: str) -> tuple[Proc, int]:
    import httpx

    port = free_port()
    proc = stack.group.start(name, api_command("127.0.0.1", port), stack.env)
    url = f"http://127.0.0.1:{port}/health"
    wait_for(lambda: httpx.get(url, timeout=2).status_code == 200, 60, name)
    return proc, port


def _log(stack: Stack, name: str) -> str:
    return (stack.root / "logs" / f"{name}.log").read_text(errors="replace")


def test_two_api_processes_requeue_a_lost_job_once(
    make_stack: Callable[..., Stack], tiny_model: Path, tiny_tsv: Path
) -> None:
    stack = make_stack("postgres")
    stack.start_api()
    _start_api(stack, "api-2")
    worker = stack.start_worker()
    wait_for(lambda: TAKEN in _log(stack, "api") + _log(stack, "api-2"), 30, "a reaper lock")
    holders = [n for n in ("api", "api-2") if TAKEN in _log(stack, n)]
    assert len(holders) == 1, holders

    model_id = register_model(stack, tiny_model, name="tiny")
    ds = stack.upload(tiny_tsv)
    job = stack.submit("evaluate", model_id=model_id, dataset_id=ds["id"], latency_runs=3000)
    stack.wait_job(job["id"], {"running"}, timeout=60)
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait(10)

    requeued = stack.wait_job(job["id"], {"queued", "failed"}, timeout=60)
    assert requeued["status"] == "queued" and requeued["attempt"] == 1, requeued
    time.sleep(3)  # both reapers sweep meanwhile (every second)
    assert stack.job(job["id"])["attempt"] == 1
    stack.start_worker(name="replacement")
    done = stack.wait_job(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempt"] == 1, (done, stack.logs())
    assert job_starts(stack)[job["id"]] == 2
    logs = _log(stack, "api") + _log(stack, "api-2")
    assert logs.count(f"job {job['id']} requeued") == 1, logs[-3000:]
    assert consistency_problems(stack) == []

    # The holder goes away: the other API process takes over the sweeps.
    holder = next(p for p in stack.group.procs if p.name == holders[0])
    os.killpg(holder.popen.pid, signal.SIGKILL)
    holder.popen.wait(10)
    other = "api-2" if holders[0] == "api" else "api"
    wait_for(lambda: TAKEN in _log(stack, other), 30, f"{other} taking the reaper lock")
