"""Faults survived by one real stack: Redis restart, database outage, inference SIGKILL.

One stack serves the module, on a Redis server of its own (restartable) and on
PostgreSQL behind a TCP proxy the test can cut: API, a worker and an inference
worker serving a tiny model. After each fault every job reaches a final state,
exactly once, and the database agrees with the artifact folder.
(A worker SIGKILLed mid-job: tests/workers/test_lifecycle.py.)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from launch.procs import Proc, free_port
from tests.deploy.helpers import build_model_folder, register_model, wait_serving
from tests.reliability.helpers import (
    TINY_TSV,
    OwnRedis,
    consistency_problems,
    job_starts,
    wait_all_final,
)
from tests.reliability.proxy import TcpProxy
from tests.stack import Stack, create_pg_database


@dataclass
class Env:
    stack: Stack
    redis: OwnRedis
    db_proxy: TcpProxy
    inference: Proc
    inference_port: int
    model_id: int
    dataset_id: int

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    def evaluate(self, latency_runs: int = 5) -> dict[str, object]:
        return self.stack.submit(
            "evaluate",
            model_id=self.model_id,
            dataset_id=self.dataset_id,
            latency_runs=latency_runs,
        )


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, tiny_model: Path, tiny_tsv: Path
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("faults")
    redis = OwnRedis(root / "redis")
    redis.start()
    real = make_url(create_pg_database(pg_server_url))
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    db_url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    stack = Stack(
        root / "stack", db_url, redis.url, requeue_lost_after=3, deployment_poll_interval=1
    )
    try:
        stack.start_api()
        stack.start_worker()
        port = free_port()
        inference, _ = stack.start_inference(port=port)
        model_id = register_model(stack, tiny_model, name="tiny")
        assert stack.http.post(f"/models/{model_id}/promote").status_code == 201
        ds = stack.upload(tiny_tsv)
        env = Env(stack, redis, proxy, inference, port, model_id, ds["id"])
        wait_serving(env.inference_url, model_id)
        yield env
    finally:
        stack.close()
        proxy.close()
        redis.close()


def _all_consistent(env: Env) -> None:
    problems = consistency_problems(env.stack)
    assert problems == [], problems


def test_redis_restart_loses_no_job(env: Env) -> None:
    """Redis keeps nothing on disk: a restart loses the queued messages, not the jobs."""
    stack = env.stack
    # One job long enough to be running across the restart, three queued behind it.
    long = env.evaluate(latency_runs=1200)
    stack.wait_job(int(long["id"]), {"running"}, timeout=60)
    quick = [env.evaluate() for _ in range(3)]
    assert all(stack.job(int(j["id"]))["status"] == "queued" for j in quick)

    env.redis.restart()
    assert stack.job(int(long["id"]))["status"] == "running"

    ids = [int(long["id"]), *(int(j["id"]) for j in quick)]
    done = wait_all_final(stack, ids, timeout=120)
    assert [j["status"] for j in done] == ["succeeded"] * 4, (done, stack.logs())
    assert all(j["attempt"] == 0 for j in done), done
    # Each job ran exactly once: a re-sent message never runs a job twice.
    starts = job_starts(stack)
    assert {i: starts.get(i) for i in ids} == dict.fromkeys(ids, 1), starts
    # The queued messages were lost with the old Redis and sent again by the reaper.
    api_log = (stack.root / "logs" / "api.log").read_text(errors="replace")
    assert any(f"job {i} (attempt 0) was queued" in api_log for i in ids[1:]), api_log[-3000:]
    # Everything works on the new server: a new job runs, predictions go on.
    assert stack.wait_job(int(env.evaluate()["id"]), timeout=60)["status"] == "succeeded"
    r = httpx.post(f"{env.inference_url}/predict", json={"text": "很好"}, timeout=10)
    assert r.status_code == 200, r.text
    _all_consistent(env)


def _wait_working(stack: Stack, job_id: int, timeout: float = 60) -> None:
    """Until the job is past its claim and reports progress from its work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.job(job_id)
        if job["status"] == "running" and job["stage"] not in (None, "starting"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} is not working: {stack.job(job_id)}")


def _expect_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert "database unavailable" in response.json()["detail"]
    assert response.headers.get("retry-after")


def test_database_outage_is_survived(env: Env, tmp_path: Path) -> None:
    """PostgreSQL away for a few seconds: 503s with the reason, then recovery by itself."""
    stack = env.stack
    long = env.evaluate(latency_runs=1500)
    _wait_working(stack, int(long["id"]))

    env.db_proxy.cut()
    try:
        _expect_503(stack.http.get("/jobs"))
        _expect_503(stack.http.get(f"/jobs/{long['id']}"))
        _expect_503(stack.http.get("/models"))
        body = {"kind": "evaluate", "params": {"model_id": env.model_id, "dataset_id": 1}}
        _expect_503(stack.http.post("/jobs", json=body))
        files = {"file": ("d.tsv", TINY_TSV.encode(), "text/tab-separated-values")}
        _expect_503(stack.http.post("/datasets", files=files))
        assert stack.http.get("/health").status_code == 200
        # The inference worker keeps serving the model it has.
        r = httpx.post(f"{env.inference_url}/predict", json={"text": ["很好", "太差"]}, timeout=10)
        assert r.status_code == 200 and r.json()["model_id"] == env.model_id, r.text
        time.sleep(3)  # heartbeats, reaper sweeps and deployment polls fail meanwhile
        assert all(p.alive() for p in stack.group.procs), stack.logs()
    finally:
        env.db_proxy.restore()

    # Every service recovers by itself (pool_pre_ping drops the dead connections).
    deadline = time.monotonic() + 30
    while stack.http.get("/jobs").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stack.http.get("/jobs").status_code == 200
    assert stack.upload(env_tsv(tmp_path))["rows"] == 6
    quick = env.evaluate()
    done = wait_all_final(stack, [int(long["id"]), int(quick["id"])], timeout=120)
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], (done, stack.logs())
    # The running job rode out the outage: not failed, not restarted.
    assert done[0]["attempt"] == 0 and job_starts(stack)[int(long["id"])] == 1, done[0]
    # The inference worker reads the database again: it follows a new promotion.
    b = register_model(stack, build_model_folder(tmp_path / "b", label=1, seed=1), name="B")
    assert stack.http.post(f"/models/{b}/promote").status_code == 201
    wait_serving(env.inference_url, b, timeout=60)
    assert stack.http.post(f"/models/{env.model_id}/promote").status_code == 201
    wait_serving(env.inference_url, env.model_id, timeout=60)
    _all_consistent(env)


def env_tsv(folder: Path) -> Path:
    path = folder / "again.tsv"
    path.write_text(TINY_TSV, encoding="utf-8")
    return path


def test_inference_worker_killed_and_restarted(env: Env, tmp_path: Path) -> None:
    """SIGKILL, a promotion while it is down, restart: it serves the current deployment."""
    stack = env.stack
    os.killpg(env.inference.popen.pid, signal.SIGKILL)
    assert env.inference.popen.wait(10) == -signal.SIGKILL
    stack.group.stop(env.inference)
    c = register_model(stack, build_model_folder(tmp_path / "c", label=1, seed=2), name="C")
    assert stack.http.post(f"/models/{c}/promote").status_code == 201

    env.inference, url = stack.start_inference(port=env.inference_port)
    ready = wait_serving(url, c)
    assert ready["target_model_id"] == c
    r = httpx.post(f"{url}/predict", json={"text": ["很好", "太差了"]}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == c and r.json()["categories"] == [1, 1]
    assert stack.http.get("/deployments/current").json()["model_id"] == c
    _all_consistent(env)


@pytest.mark.parametrize("worker_killed", [False, True], ids=["blip", "blip-and-kill"])
def test_pipeline_finishes_after_outage_right_after_a_step_commits(
    env: Env, worker_killed: bool
) -> None:
    """The database goes away just as a pipeline step's success commits.

    The step's worker retries advancing the pipeline until the database is
    back; if that worker is killed meanwhile too, the reaper's sweep advances
    the pipeline, stalled with every step final. Either way it finishes.
    """
    stack = env.stack
    env.db_proxy.cut_after_commit(b"succeeded")  # a bound parameter of the success UPDATE
    job = stack.submit(
        "pipeline",
        model_id=env.model_id,
        dataset_id=env.dataset_id,
        eval_dataset_id=env.dataset_id,
        steps=["export"],
    )
    try:
        assert env.db_proxy.tripped.wait(120), stack.logs()
        if worker_killed:
            worker = stack.workers[-1]
            os.killpg(worker.popen.pid, signal.SIGKILL)
            worker.popen.wait(10)
        time.sleep(4)
    finally:
        env.db_proxy.restore()
    if worker_killed:
        stack.start_worker(name="replacement")
    deadline = time.monotonic() + 30
    while stack.http.get("/jobs").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    done = stack.wait_job(int(job["id"]), timeout=180)
    assert done["status"] == "succeeded", (done, stack.logs())
    children = stack.http.get("/jobs", params={"parent_id": job["id"]}).json()
    assert children and all(c["status"] == "succeeded" for c in children), children
    if worker_killed:
        api_log = (stack.root / "logs" / "api.log").read_text(errors="replace")
        assert f"pipeline {job['id']} was stalled with every step final" in api_log, api_log[-3000:]
    _all_consistent(env)
