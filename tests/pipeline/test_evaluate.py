"""The evaluate step on a trained model and its ONNX export, and the numpy metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.common import JobCancelled, StepError
from pipeline.corpus import Splits
from pipeline.data import read_tsv, write_tsv
from pipeline.evaluate import evaluate, main, model_size_bytes
from pipeline.metrics import classification_metrics, confusion_matrix

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def torch_eval(trained_tiny_model: Path, small_splits: Splits) -> dict[str, Any]:
    return evaluate(trained_tiny_model, small_splits.test, latency_runs=30, device="cpu", threads=1)


def _check_consistent(m: dict[str, Any], rows: int) -> None:
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == rows == m["rows"]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / rows)
    assert 0.0 <= m["macro_f1"] <= 1.0
    assert set(m["per_class"]) == {"0", "1"}
    assert sum(c["support"] for c in m["per_class"].values()) == rows
    for label, c in m["per_class"].items():
        assert c["support"] == cm[int(label)].sum()
        assert 0.0 <= c["precision"] <= 1.0 and 0.0 <= c["recall"] <= 1.0
    assert m["macro_f1"] == pytest.approx(np.mean([c["f1"] for c in m["per_class"].values()]))
    lat = m["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] and lat["mean"] > 0
    assert m["throughput_per_s"] > 0
    assert m["size_bytes"] > 0 and m["num_labels"] == 2 and m["device"] == "cpu"


def test_evaluate_pytorch(torch_eval: dict[str, Any], trained_tiny_model: Path) -> None:
    _check_consistent(torch_eval, 400)
    assert torch_eval["format"] == "pytorch"
    assert torch_eval["accuracy"] > 0.6  # a trained model, far from chance
    assert torch_eval["size_bytes"] == (trained_tiny_model / "model.safetensors").stat().st_size
    json.dumps(torch_eval)  # stored as a job's metrics


def test_evaluate_onnx_matches_pytorch(
    trained_tiny_onnx: Path, small_splits: Splits, torch_eval: dict[str, Any]
) -> None:
    m = evaluate(trained_tiny_onnx, small_splits.test, latency_runs=10, device="cpu", threads=1)
    _check_consistent(m, 400)
    assert m["format"] == "onnx"
    assert m["size_bytes"] == model_size_bytes(trained_tiny_onnx) > 0
    assert m["confusion_matrix"] == torch_eval["confusion_matrix"]


def test_label_mismatch_raises(tmp_path: Path, trained_tiny_model: Path) -> None:
    path = tmp_path / "three.tsv"
    write_tsv(path, ["很好", "很差", "一般"], [0, 1, 2])
    with pytest.raises(StepError, match=r"dataset has labels \[0, 1, 2\] but model has 2 labels"):
        evaluate(trained_tiny_model, path, latency_runs=0, threads=1)


def test_fewer_classes_than_the_model_and_no_latency(
    tmp_path: Path, trained_tiny_model: Path, small_splits: Splits
) -> None:
    data = read_tsv(small_splits.test)
    negatives = [t for t, y in zip(data.texts, data.labels, strict=True) if y == 0][:20]
    path = tmp_path / "neg.tsv"
    write_tsv(path, negatives, [0] * len(negatives))
    m = evaluate(trained_tiny_model, path, latency_runs=0, device="cpu", threads=1)
    assert m["latency_ms"] is None
    assert np.array(m["confusion_matrix"]).shape == (2, 2)
    assert m["per_class"]["1"]["support"] == 0
    assert m["accuracy"] == pytest.approx(m["per_class"]["0"]["recall"])


def test_progress_can_cancel(trained_tiny_model: Path, small_splits: Splits) -> None:
    seen: list[float] = []

    def cancel(fraction: float, stage: str | None = None) -> None:
        seen.append(fraction)
        if len(seen) == 2:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        evaluate(trained_tiny_model, small_splits.test, latency_runs=0, progress=cancel, threads=1)


def test_cli(
    trained_tiny_model: Path, small_splits: Splits, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(trained_tiny_model), "--data", str(small_splits.dev)]
    assert main([*args, "--latency-runs", "5", "--device", "cpu", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 200 and out["latency_ms"]["runs"] == 5


def test_metrics_against_hand_counts() -> None:
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 0]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    m = classification_metrics(y_true, y_pred, 3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # class 0: P 1/3 R 1/2; class 1: P 2/3 R 2/3; class 2: P 0 (none predicted) R 0
    f0 = 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)
    f1 = 2 / 3
    assert m["per_class"]["0"]["f1"] == pytest.approx(f0)
    assert m["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((f0 + f1 + 0.0) / 3)
    # A class the model never outputs and the data never has is left out of the mean.
    m4 = classification_metrics(y_true, y_pred, 4)
    assert m4["macro_f1"] == pytest.approx(m["macro_f1"])
    assert len(m4["confusion_matrix"]) == 4
