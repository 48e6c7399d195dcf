"""Job lifecycle through real Celery worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.corpus import Splits
from tests.reliability.helpers import consistency_problems
from tests.stack import Stack


def test_train_job_lifecycle(
    make_stack: Callable[..., Stack], backend: str, job_splits: Splits
) -> None:
    stack = make_stack(backend)
    stack.start_api()
    # The stack runs with OMP_NUM_THREADS=1; the worker setting must win over it.
    stack.start_worker(TEXTCLS_WORKER_THREADS="2")
    train = stack.upload(job_splits.train, "train")
    dev = stack.upload(job_splits.dev, "dev")
    job = stack.submit(
        "train",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        epochs=1,
        max_length=48,
        batch_size=32,
    )
    assert job["status"] == "queued"
    seen_running = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        cur = stack.job(job["id"])
        seen_running |= cur["status"] == "running"
        if cur["status"] in {"succeeded", "failed", "cancelled"}:
            break
        time.sleep(0.2)
    assert cur["status"] == "succeeded", (cur, stack.logs())
    assert seen_running or cur["started_at"] is not None
    assert cur["progress"] == 1.0
    assert cur["started_at"] and cur["finished_at"] and cur["error"] is None
    assert cur["metrics"]["train_rows"] == 400
    model = stack.http.get(f"/models/{cur['output_model_id']}").json()
    assert model["format"] == "pytorch" and model["job_id"] == job["id"]
    assert model["num_labels"] == 2 and model["size_bytes"] > 0
    folder = stack.root / "artifacts" / "models" / str(model["id"])
    # A standard Hugging Face folder: loads with the Auto classes.
    AutoModelForSequenceClassification.from_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder))
    # Nothing left behind in the staging area.
    assert not any((stack.root / "artifacts" / "tmp").iterdir())
    # Jobs run on TEXTCLS_WORKER_THREADS CPU threads.
    ev = stack.wait_job(
        stack.submit("evaluate", model_id=model["id"], dataset_id=dev["id"], latency_runs=5)["id"]
    )
    assert ev["status"] == "succeeded", (ev, stack.logs())
    assert ev["metrics"]["threads"] == 2 and ev["metrics"]["device"] == "cpu"


def test_failed_job_says_why(
    make_stack: Callable[..., Stack], job_splits: Splits, tmp_path: Path
) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    stack.start_worker()
    train = stack.upload(job_splits.train)
    job = stack.submit(
        "train", dataset_id=train["id"], base_model=str(stack.root / "imports" / "nope")
    )
    done = stack.wait_job(job["id"], timeout=120)
    assert done["status"] == "failed"
    assert "nope" in done["error"]
    assert stack.http.get("/models").json() == []


def test_cancel_running_job(make_stack: Callable[..., Stack], big_train: Path) -> None:
    stack = make_stack("postgres")
    stack.start_api()
    stack.start_worker()
    train = stack.upload(big_train)
    job = stack.submit("train", dataset_id=train["id"], epochs=20, batch_size=8)
    stack.wait_job(job["id"], {"running"}, timeout=120)
    time.sleep(1.5)
    r = stack.http.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["cancel_requested"] is True
    done = stack.wait_job(job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert done["output_model_id"] is None
    assert stack.http.get("/models").json() == []


def test_worker_sigkill_without_retries_fails_the_job(
    make_stack: Callable[..., Stack], big_train: Path
) -> None:
    """SIGKILL of the worker's main process (and its pool) mid-train, no attempt left.

    The job fails with the reason instead of staying ``running``, and the old
    message (which Redis would redeliver only after its visibility timeout)
    can never run it a second time.
    """
    stack = make_stack("sqlite", max_attempts=1)
    stack.start_api()
    worker = stack.start_worker()
    train = stack.upload(big_train)
    job = stack.submit("train", dataset_id=train["id"], epochs=20, max_length=32, batch_size=64)
    stack.wait_job(job["id"], {"running"}, timeout=120)
    time.sleep(1.0)
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait(10)
    done = stack.wait_job(job["id"], timeout=60)
    assert done["status"] == "failed"
    assert "worker lost" in done["error"] and "no heartbeat" in done["error"]
    # Nothing half-written was registered, and no orphan artifact or checkpoint is left.
    assert consistency_problems(stack) == []
    assert stack.http.get("/models").json() == []


def test_worker_sigkill_mid_train_resumes_from_the_checkpoint(
    make_stack: Callable[..., Stack], big_train: Path
) -> None:
    """SIGKILL mid-train after a checkpoint: the requeued attempt resumes from it.

    Checkpoints every 3 s (``checkpoint_minutes`` 0.05) as well as per epoch;
    the replacement worker starts from the last one, not from zero, and the
    job's metrics say where from. Exactly one model is registered and the
    checkpoint goes when the job ends.
    """
    stack = make_stack("sqlite", max_attempts=2, checkpoint_minutes=0.05)
    stack.start_api()
    worker = stack.start_worker()
    train = stack.upload(big_train)
    job = stack.submit("train", dataset_id=train["id"], epochs=2, max_length=32, batch_size=64)
    checkpoint = stack.root / "artifacts" / "checkpoints" / str(job["id"]) / "checkpoint.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file():
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait(10)
    requeued = stack.wait_job(job["id"], {"queued", "failed"}, timeout=60)
    assert requeued["status"] == "queued" and requeued["attempt"] == 1, requeued
    assert "worker lost" in (requeued["stage"] or "")
    assert checkpoint.is_file()  # kept for the next attempt
    stack.start_worker(name="replacement")
    done = stack.wait_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, stack.logs())
    assert done["attempt"] == 1
    metrics = done["metrics"]
    assert metrics["resumed_from_step"] > 0, metrics
    per_epoch = metrics["steps"] // metrics["epochs"]
    resumed_at = metrics["resumed_from_epoch"] * per_epoch + metrics["resumed_from_batch"]
    assert resumed_at == metrics["resumed_from_step"], metrics
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert len(stack.http.get("/models").json()) == 1
    # The worker drops the checkpoint just after it commits the final state.
    deadline = time.monotonic() + 30
    while checkpoint.parent.exists():
        assert time.monotonic() < deadline, f"{checkpoint.parent} still there"
        time.sleep(0.2)
    # The database agrees with the artifact folder: one model row, one folder.
    assert consistency_problems(stack) == []
