"""Cancel stops a bert-base-size job within seconds, even inside a step that never reports.

``torch.onnx.export`` and ``quantize_dynamic`` of a 12-layer, 768-wide BERT
(random weights) each run for several seconds on one core without a progress
call, and one of its optimizer steps for tens of seconds; the worker runs them
in a child process that the cancel kills.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import VOCAB_TEXT, register_model
from tests.reliability.helpers import consistency_problems
from tests.stack import FINAL, Stack

CANCEL_LIMIT_S = 5.0
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bert-base-size classifier (12 x 768, random weights, a small vocabulary)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.modeling import save_model_folder
    from pipeline.preprocess import build_char_vocab, make_char_tokenizer

    torch.manual_seed(0)
    tok = make_char_tokenizer(build_char_vocab([VOCAB_TEXT]))
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg).eval()
    meta = ModelMeta(format="pytorch", max_length=64, num_labels=2)
    return save_model_folder(model, tok, tmp_path_factory.mktemp("bert_base") / "m", meta)


def _cancel_during(stack: Stack, job_id: int, stages: set[str], settle: float) -> float:
    """Wait until the job is in one of ``stages`` (plus ``settle`` s), cancel, time it."""
    deadline = time.monotonic() + 180
    while stack.job(job_id)["stage"] not in stages:
        assert stack.job(job_id)["status"] not in FINAL, stack.job(job_id)
        assert time.monotonic() < deadline, stack.job(job_id)
        time.sleep(0.05)
    time.sleep(settle)
    assert stack.job(job_id)["status"] == "running", stack.job(job_id)
    start = time.monotonic()
    r = stack.http.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    while stack.job(job_id)["status"] == "running":
        assert time.monotonic() - start < 60, stack.logs()
        time.sleep(0.05)
    took = time.monotonic() - start
    log.info("cancel during %s left running after %.2f s", "/".join(sorted(stages)), took)
    return took


def _assert_cancelled_cleanly(stack: Stack, job: dict[str, Any], models_before: int) -> None:
    assert job["status"] == "cancelled" and job["output_model_id"] is None, job
    assert len(stack.http.get("/models").json()) == models_before
    staging = stack.root / "artifacts" / "tmp"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    assert consistency_problems(stack) == []


def test_cancel_stops_export_quantize_and_training_of_bert_base(
    make_stack: Callable[..., Stack], bert_base: Path, tmp_path: Path
) -> None:
    stack = make_stack("sqlite")
    stack.start_api()
    stack.start_worker()
    model_id = register_model(stack, bert_base, name="bert-base")
    # The quantize input: an ONNX export that runs to the end.
    export = stack.wait_job(stack.submit("export", model_id=model_id)["id"], timeout=300)
    assert export["status"] == "succeeded", (export, stack.logs())
    onnx_id = export["output_model_id"]

    # Cancel inside torch.onnx.export ("exporting" is reported just before it).
    job = stack.submit("export", model_id=model_id)
    took = _cancel_during(stack, job["id"], {"exporting"}, settle=1.0)
    done = stack.job(job["id"])
    assert took < CANCEL_LIMIT_S, (took, done)
    _assert_cancelled_cleanly(stack, done, models_before=2)

    # Cancel inside quantize_dynamic ("quantizing" is reported just before it).
    job = stack.submit("quantize", model_id=onnx_id)
    took = _cancel_during(stack, job["id"], {"quantizing"}, settle=1.0)
    done = stack.job(job["id"])
    assert took < CANCEL_LIMIT_S, (took, done)
    _assert_cancelled_cleanly(stack, done, models_before=2)

    # Cancel inside a training step: one optimizer step of this model takes tens
    # of seconds on CPU, so a cancel checked between steps would wait that long.
    data = _tiny_dataset(stack, tmp_path)
    params = {"epochs": 1, "batch_size": 32, "max_length": 64, "device": "cpu"}
    job = stack.submit("train", dataset_id=data, base_model_id=model_id, **params)
    took = _cancel_during(stack, job["id"], {"train"}, settle=1.0)
    done = stack.job(job["id"])
    assert took < CANCEL_LIMIT_S, (took, done)
    _assert_cancelled_cleanly(stack, done, models_before=2)

    # The worker is fine afterwards: the step runs to the end when left alone.
    ev = stack.submit("evaluate", model_id=onnx_id, dataset_id=data, latency_runs=5)
    assert stack.wait_job(ev["id"], timeout=120)["status"] == "succeeded", stack.logs()


def _tiny_dataset(stack: Stack, folder: Path) -> int:
    from tests.reliability.helpers import TINY_TSV

    path = folder / "tiny.tsv"
    path.write_text(TINY_TSV, encoding="utf-8")
    return int(stack.upload(path)["id"])
