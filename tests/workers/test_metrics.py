"""A real Celery worker's Prometheus metrics (``TEXTCLS_WORKER_METRICS_PORT``), checked
against what the API says its jobs did."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from launch.procs import free_port, wait_for
from pipeline.corpus import Splits
from tests.deploy.helpers import fake_model_folder, register_model
from tests.prometheus import sample, scrape
from tests.stack import Stack

TINY = {"base_model": "scratch:tiny", "epochs": 1, "max_length": 32, "batch_size": 32}


def test_worker_metrics_follow_its_jobs(
    make_stack: Callable[..., Stack], job_splits: Splits, big_train: Path, tmp_path: Path
) -> None:
    port = free_port()
    stack = make_stack("sqlite", worker_metrics_port=port)
    stack.start_api()
    stack.start_worker()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: httpx.get(url, timeout=2).status_code == 200, 30, "worker metrics")
    before = scrape(url)
    assert sample(before, "textcls_worker_running_jobs") == 0
    assert sample(before, "textcls_worker_heartbeat_age_seconds") == 0

    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)

    # A one-step pipeline: its parent detaches, its train step succeeds (a step duration).
    pipe = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        steps=["train"],
        baseline=False,
        **TINY,
    )
    stack.wait_job(pipe["id"], timeout=300)
    children = stack.http.get("/jobs", params={"parent_id": pipe["id"]}).json()
    step_train = next(c for c in children if c["kind"] == "train")
    assert step_train["status"] == "succeeded", (step_train, stack.logs())
    # A job that fails: a model folder with no weights cannot be evaluated.
    empty = register_model(stack, fake_model_folder(tmp_path / "empty"), name="no weights")
    bad = stack.submit("evaluate", model_id=empty, dataset_id=dev["id"])
    assert stack.wait_job(bad["id"])["status"] == "failed"

    after = scrape(url)
    jobs = stack.http.get("/jobs", params={"limit": 100}).json()
    for kind in {j["kind"] for j in jobs}:
        ran = [j for j in jobs if j["kind"] == kind]
        assert sample(after, "textcls_worker_jobs_started_total", kind=kind) == len(ran), kind
        if kind == "pipeline":
            # The parent hands its work to its steps (their lifecycle ends it): detached.
            got = sample(after, "textcls_worker_jobs_finished_total", kind=kind, outcome="detached")
            assert got == len(ran)
            continue
        outcomes = {j["status"] for j in ran} - {"running"}
        for outcome in outcomes:
            want = sum(1 for j in ran if j["status"] == outcome)
            got = sample(after, "textcls_worker_jobs_finished_total", kind=kind, outcome=outcome)
            assert got == want, (kind, outcome, got, want)
        failed = sum(1 for j in ran if j["status"] == "failed")
        assert sample(after, "textcls_worker_jobs_failed_total", kind=kind) == failed
    assert sample(after, "textcls_worker_step_duration_seconds_count", step="train") == 1
    took = sample(
        after, "textcls_worker_job_duration_seconds_sum", kind="train", outcome="succeeded"
    )
    assert took > 0
    assert sample(after, "textcls_worker_running_jobs") == 0
    assert sample(after, "textcls_worker_heartbeat_age_seconds") == 0

    # While a job runs: one running job, a fresh heartbeat; then cancelled.
    big = stack.upload(big_train)
    long = stack.submit("train", dataset_id=big["id"], **{**TINY, "epochs": 50})
    stack.wait_job(long["id"], {"running"}, timeout=60)
    time.sleep(2.5)  # a few heartbeats (interval 1 s in the test stack)
    running = scrape(url)
    assert sample(running, "textcls_worker_running_jobs") == 1
    age = sample(running, "textcls_worker_heartbeat_age_seconds")
    assert 0 < age < 8, age  # beats every 1 s; the reaper's timeout is 8 s
    r = stack.http.post(f"/jobs/{long['id']}/cancel")
    assert r.status_code == 200, r.text
    assert stack.wait_job(long["id"], timeout=60)["status"] == "cancelled"
    wait_for(lambda: sample(scrape(url), "textcls_worker_running_jobs") == 0, 10, "idle")
    done = scrape(url)
    assert (
        sample(done, "textcls_worker_jobs_finished_total", kind="train", outcome="cancelled") == 1
    )
    assert sample(done, "textcls_worker_heartbeat_age_seconds") == 0


def test_worker_metrics_off_by_default(make_stack: Callable[..., Stack]) -> None:
    """Port 0 (the default): the worker listens on no metrics port."""
    from textcls.settings import Settings

    assert Settings().worker_metrics_port == 0
    stack = make_stack("sqlite")
    proc = stack.start_worker()
    assert "worker metrics on" not in proc.tail(200)
