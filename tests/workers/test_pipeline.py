"""The ``pipeline`` job end to end through real workers, with its report."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.corpus import Splits
from tests.stack import Stack

TRAIN = {"epochs": 1, "max_length": 48, "batch_size": 32}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium: scripts/test.sh installs Debian's chromium package")


def _dump_dom(url: str, tmp: Path) -> str:
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chrome'}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_pipeline_end_to_end(
    make_stack: Callable[..., Stack], job_splits: Splits, tmp_path: Path
) -> None:
    stack = make_stack("postgres")
    stack.start_api()
    stack.start_worker()
    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    job = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        base_model="scratch:tiny",
        max_accuracy_drop=1.0,
        promote=True,
        **TRAIN,
    )
    done = stack.wait_job(job["id"], timeout=900)
    assert done["status"] == "succeeded", (done, stack.logs())
    children = stack.http.get("/jobs", params={"parent_id": job["id"]}).json()
    kinds = sorted(c["kind"] for c in children)
    assert kinds.count("evaluate") == 6
    assert {"train", "prune", "distill", "export", "fp16", "quantize"} <= set(kinds)
    assert all(c["status"] == "succeeded" for c in children)

    report = stack.http.get(f"/jobs/{job['id']}/report").json()
    variants = report["variants"]
    assert [v["step"] for v in variants] == [
        "train",
        "prune",
        "distill",
        "export",
        "fp16",
        "quantize",
    ]
    assert [v["format"] for v in variants] == [
        "pytorch",
        "pytorch",
        "pytorch",
        "onnx",
        "onnx-fp16",
        "onnx-int8",
    ]
    for v in variants:
        assert v["accuracy"] is not None and v["latency_p50_ms"] > 0
    chosen = [v for v in variants if v["chosen"]]
    assert len(chosen) == 1 and chosen[0]["model_id"] == done["output_model_id"]
    # Budget respected, cpu target never picks fp16, and nothing eligible is faster.
    assert chosen[0]["drop_points"] <= 1.0 and chosen[0]["format"] != "onnx-fp16"
    eligible = [v for v in variants if v["within_budget"] and v["format"] != "onnx-fp16"]
    assert chosen[0]["latency_p50_ms"] == min(v["latency_p50_ms"] for v in eligible)
    # Promoted.
    current = stack.http.get("/deployments").json()[0]
    assert current["model_id"] == done["output_model_id"]

    # The HTML report in a real headless browser: the table and the chart.
    dom = _dump_dom(f"{stack.api_url}/jobs/{job['id']}/report.html", tmp_path)
    # One row per variant, then the TF-IDF + LR baseline fitted on the same rows.
    tfidf = report["tfidf_baseline"]
    assert tfidf["accuracy"] > 0.6 and tfidf["latency_p50_ms"] > 0 and tfidf["size_bytes"] > 0
    assert report["verdict"] and f"{tfidf['accuracy'] * 100:.2f}%" in report["verdict"]
    assert "baseline" in kinds
    assert 'id="variants"' in dom and dom.count("<tr") == 2 + len(variants)
    assert 'class="baseline"' in dom and 'id="verdict"' in dom
    assert 'id="tradeoff-chart"' in dom and dom.count('class="point"') == len(variants)
    assert 'class="chosen"' in dom

    # Budget 0 from the trained model: the choice never loses accuracy.
    teacher = variants[0]["model_id"]
    job0 = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        model_id=teacher,
        steps=["export", "quantize"],
        max_accuracy_drop=0,
    )
    done0 = stack.wait_job(job0["id"], timeout=300)
    assert done0["status"] == "succeeded", done0
    rep0 = stack.http.get(f"/jobs/{job0['id']}/report").json()
    assert [v["step"] for v in rep0["variants"]] == ["start", "export", "quantize"]
    pick = next(v for v in rep0["variants"] if v["chosen"])
    assert pick["drop_points"] <= 0
    assert pick["model_id"] == teacher or pick["accuracy"] >= rep0["baseline_accuracy"]


def test_pipeline_failing_step_and_cancel(
    make_stack: Callable[..., Stack], job_splits: Splits, big_train: Path, tmp_path: Path
) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    stack.start_worker()
    train = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    bad = stack.submit(
        "pipeline",
        dataset_id=train["id"],
        eval_dataset_id=dev["id"],
        base_model=str(stack.root / "imports" / "no-such-model"),
        **TRAIN,
    )
    done = stack.wait_job(bad["id"], timeout=120)
    assert done["status"] == "failed"
    assert "step train" in done["error"] and "no-such-model" in done["error"]
    children = stack.http.get("/jobs", params={"parent_id": bad["id"]}).json()
    assert [c["kind"] for c in children] == ["train"]  # nothing after the failed step

    big = stack.upload(big_train)
    long = stack.submit(
        "pipeline",
        dataset_id=big["id"],
        eval_dataset_id=dev["id"],
        base_model="scratch:tiny",
        epochs=20,
        batch_size=8,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        kids = stack.http.get("/jobs", params={"parent_id": long["id"]}).json()
        if kids and kids[0]["status"] == "running":
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"train step never ran\n{stack.logs()}")
    r = stack.http.post(f"/jobs/{long['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    child = stack.wait_job(kids[0]["id"], timeout=60)
    assert child["status"] == "cancelled"
    time.sleep(1)
    assert len(stack.http.get("/jobs", params={"parent_id": long["id"]}).json()) == 1
    assert stack.job(long["id"])["status"] == "cancelled"
