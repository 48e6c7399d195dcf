"""Job logs (``GET /jobs/{id}/logs``, ``textcls jobs logs``) and deleting finished jobs,
through real worker processes running real jobs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from pipeline.corpus import Splits
from tests.reliability.helpers import consistency_problems
from tests.stack import FINAL, REPO, Stack

TEXTCLS = str(REPO / ".venv" / "bin" / "textcls")


def _log(stack: Stack, job_id: int, **params: int) -> httpx.Response:
    r = stack.http.get(f"/jobs/{job_id}/logs", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r


def _cli(stack: Stack, *args: str) -> tuple[int, str]:
    """``textcls *args`` against the stack: exit code and stdout (``\r`` kept as printed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTCLS_")}
    env.update(stack.env)
    out = subprocess.run([TEXTCLS, *args], env=env, capture_output=True, timeout=120, check=False)
    return out.returncode, out.stdout.decode()


def _log_while_running(stack: Stack, job_id: int) -> str:
    """The job's log as read while the job was running (the runner's first line is in it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = _log(stack, job_id).text
        status = stack.job(job_id)["status"]
        if status == "running" and "started on" in text:
            return text
        assert status not in FINAL, f"job {job_id} ended before its log was seen: {text}"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never logged while running\n{stack.logs()}")


def test_a_jobs_log_during_and_after_its_run_then_deleted_with_it(
    make_stack: Callable[..., Stack], backend: str, job_splits: Splits
) -> None:
    stack = make_stack(backend)
    stack.start_api()
    worker = stack.start_worker()
    train = stack.upload(job_splits.train, "train")
    dev = stack.upload(job_splits.dev, "dev")
    job = stack.submit(
        "train", dataset_id=train["id"], eval_dataset_id=dev["id"], epochs=1, max_length=48
    )
    assert _log(stack, job["id"]).text == ""  # queued: nothing logged yet
    early = _log_while_running(stack, job["id"])
    assert f"job {job['id']} (train) attempt 0 started on" in early
    # A running job holds the datasets it reads.
    r = stack.http.delete(f"/datasets/{dev['id']}")
    assert r.status_code == 409, r.text
    assert f"job {job['id']} (train, running) reads it as eval_dataset_id" in r.json()["detail"]

    done = stack.wait_job(job["id"])
    assert done["status"] == "succeeded", (done, stack.logs())
    full = _log(stack, job["id"]).text
    assert full.startswith(early)
    assert "INFO pipeline.train: train: 400 rows" in full  # the step's own records
    assert f"INFO workers.runner: job {job['id']} succeeded" in full
    # Captured only while the job runs: Celery's own "Task ... succeeded" line comes after.
    assert "celery.app.trace" not in full

    lines = full.splitlines(keepends=True)
    tail = _log(stack, job["id"], tail=2)
    assert tail.text == "".join(lines[-2:])
    end = int(tail.headers["X-Log-Offset"])
    assert end == len(full.encode()) and tail.headers["X-Job-Status"] == "succeeded"
    assert _log(stack, job["id"], offset=end).text == ""
    assert _log(stack, job["id"], offset=end - len(lines[-1].encode())).text == lines[-1]
    assert stack.http.get("/jobs/999/logs").status_code == 404
    assert stack.http.get(f"/jobs/{job['id']}/logs", params={"tail": 0}).status_code == 422
    assert stack.http.get(f"/jobs/{job['id']}/logs", params={"offset": -1}).status_code == 422

    # A failing job's log says what led to the failure.
    bad = stack.submit("train", dataset_id=train["id"], base_model=str(stack.root / "imports/no"))
    assert stack.wait_job(bad["id"])["status"] == "failed"
    assert f"WARNING workers.runner: job {bad['id']} failed:" in _log(stack, bad["id"]).text

    # The log outlives the worker process, and the CLI prints it.
    stack.group.stop(worker)
    assert _log(stack, job["id"]).text == full
    assert _cli(stack, "jobs", "logs", str(job["id"]), "--tail", "1") == (0, lines[-1])
    # --follow ends by itself: the job is final.
    assert _cli(stack, "jobs", "logs", str(job["id"]), "--follow") == (0, full)
    assert _cli(stack, "jobs", "logs", "999")[0] == 1

    # Deleting the job takes its model, evaluations and log with it.
    model_id = done["output_model_id"]
    r = stack.http.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    gone = r.json()
    assert gone["jobs"] == [job["id"]] and gone["models"] == [model_id]
    assert sorted(gone["files"]) == [f"logs/{job['id']}.log", f"models/{model_id}"]
    assert stack.http.get(f"/models/{model_id}").status_code == 404
    assert stack.http.get(f"/jobs/{job['id']}/logs").status_code == 404
    assert not (stack.root / "artifacts" / "logs" / f"{job['id']}.log").exists()
    assert consistency_problems(stack) == []


def test_a_pipelines_log_lists_its_steps_and_it_goes_with_them(
    make_stack: Callable[..., Stack], job_splits: Splits, tmp_path: Path
) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    stack.start_worker()
    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    job = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        base_model=str(stack.root / "imports" / "no-such-model"),
        epochs=1,
    )
    assert stack.wait_job(job["id"], timeout=120)["status"] == "failed"
    (step,) = stack.http.get("/jobs", params={"parent_id": job["id"]}).json()
    text = _log(stack, job["id"]).text
    assert f"job {job['id']}: submitted step train as job {step['id']}" in text
    assert f"job {job['id']}: pipeline failed: step train (job {step['id']}) failed" in text
    assert "no-such-model" in _log(stack, step["id"]).text

    r = stack.http.delete(f"/jobs/{step['id']}")
    assert r.status_code == 409 and f"pipeline job {job['id']}" in r.json()["detail"]
    r = stack.http.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["jobs"] == [step["id"], job["id"]]
    assert sorted(r.json()["files"]) == sorted(f"logs/{j}.log" for j in (job["id"], step["id"]))
    assert stack.http.get(f"/jobs/{step['id']}").status_code == 404
    assert consistency_problems(stack) == []
