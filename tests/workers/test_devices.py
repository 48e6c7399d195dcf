"""A job's ``device`` and a gpu-target pipeline's routing, through the real stack.

This machine has no CUDA device, so these are the CPU-fallback checks: a
malformed device is a 422 at submit time; ``device="cpu"`` trains; a CUDA
request fails the job at its start with an error naming the device and what
the worker has; a ``target_device=gpu`` pipeline sends its evaluations and its
fp16 step to the ``gpu`` queue, and when a worker without a GPU takes them the
evaluations record ``device=cpu`` and the report says the timing was not on the
target. The CUDA path itself: tests/pipeline/test_gpu.py on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipeline.corpus import Splits
from tests.stack import Stack

TRAIN = {"epochs": 1, "max_length": 48, "batch_size": 32}


def test_malformed_device_is_a_422(make_stack: Callable[..., Stack], job_splits: Splits) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    # 422 naming the field and the allowed values; nothing stored.
    for bad in ("cuda:x", "gpu", "cuda:-1", "CUDA", "cuda:0:1", ""):
        for kind, params in (
            ("train", {"dataset_id": train["id"]}),
            ("evaluate", {"model_id": 1, "dataset_id": dev["id"]}),
            ("pipeline", {"dataset_id": train["id"], "eval_dataset_id": dev["id"]}),
        ):
            r = stack.http.post("/jobs", json={"kind": kind, "params": {**params, "device": bad}})
            assert r.status_code == 422, (bad, kind, r.text)
            assert "device" in r.text and "auto, cpu, cuda or cuda:N" in r.text, r.text
    assert stack.http.get("/jobs").json() == []
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        r = stack.http.post(
            "/jobs", json={"kind": "train", "params": {"dataset_id": train["id"], "device": good}}
        )
        assert r.status_code == 202 and r.json()["params"]["device"] == good, r.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_device_fallback_and_gpu_routing(
    make_stack: Callable[..., Stack], job_splits: Splits
) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    stack.start_worker()
    # A CUDA request on a worker without CUDA fails at once, saying what it has.
    for name in ("cuda", "cuda:1"):
        job = stack.submit("train", dataset_id=train["id"], device=name, **TRAIN)
        done = stack.wait_job(job["id"], timeout=120)
        assert done["status"] == "failed", done
        assert repr(name) in done["error"] and "no CUDA device" in done["error"], done
        assert "device_count 0" in done["error"] and done["output_model_id"] is None
    # device=cpu trains, and the metrics say where.
    job = stack.submit("train", dataset_id=train["id"], device="cpu", **TRAIN)
    done = stack.wait_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, stack.logs())
    assert done["metrics"]["device"] == "cpu" and done["metrics"]["precision"] == "fp32"
    model_id = done["output_model_id"]

    # A gpu-target pipeline: evaluations and fp16 on the gpu queue (this worker
    # takes gpu and cpu, so they run here, on the CPU, and say so).
    pipe = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        model_id=model_id,
        steps=["export", "fp16"],
        target_device="gpu",
        baseline=False,
    )
    done = stack.wait_job(pipe["id"], timeout=600)
    assert done["status"] == "succeeded", (done, stack.logs())
    children = stack.http.get("/jobs", params={"parent_id": pipe["id"]}).json()
    queues = {c["params"]["_step"]: c["queue"] for c in children}
    assert queues == {
        "evaluate:start": "gpu",
        "export": "cpu",
        "evaluate:export": "gpu",
        "fp16": "gpu",
        "evaluate:fp16": "gpu",
    }, queues
    evaluations = [c for c in children if c["kind"] == "evaluate"]
    assert all(c["params"]["device"] == "auto" for c in evaluations)
    assert all(c["metrics"]["device"] == "cpu" for c in evaluations)
    report = stack.http.get(f"/jobs/{pipe['id']}/report").json()
    assert report["target_device"] == "gpu" and report["measured_on"] == ["cpu"]
    assert "timed on cpu" in report["device_warning"]

    # A cpu target times on the CPU, with no warning.
    pipe = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        model_id=model_id,
        steps=["export"],
        baseline=False,
    )
    done = stack.wait_job(pipe["id"], timeout=300)
    assert done["status"] == "succeeded", (done, stack.logs())
    children = stack.http.get("/jobs", params={"parent_id": pipe["id"]}).json()
    assert {c["queue"] for c in children if c["kind"] == "evaluate"} == {"cpu"}
    assert all(c["params"]["device"] == "cpu" for c in children if c["kind"] == "evaluate")
    report = stack.http.get(f"/jobs/{pipe['id']}/report").json()
    assert report["measured_on"] == ["cpu"] and report["device_warning"] is None
