"""bench/quality_sweep.py: the paired summary and the prepared split folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.quality_sweep import BASELINE, main, summarize
from pipeline.data import read_tsv


def test_summary_pairs_each_run_with_the_baseline_of_its_split() -> None:
    rows = [
        {"config": BASELINE, "split": 1, "accuracy": 0.80, "seconds": 1.0},
        {"config": BASELINE, "split": 2, "accuracy": 0.90, "seconds": 1.0},
        {"config": "a", "split": 1, "accuracy": 0.81, "seconds": 10.0},
        {"config": "a", "split": 2, "accuracy": 0.87, "seconds": 20.0},
        {"config": "b", "split": 2, "accuracy": 0.95, "seconds": 5.0},
    ]
    by_name = {s["config"]: s for s in summarize(rows)}
    a = by_name["a"]
    # Differences +0.01 and -0.03: mean -0.01, sample sd 0.02*sqrt(2), s.e. 0.02.
    assert a["runs"] == 2
    assert math.isclose(a["accuracy"], 0.84)
    assert math.isclose(a["vs_baseline"], -0.01)
    assert math.isclose(a["vs_baseline_se"], 0.02)
    assert math.isclose(a["min_vs_baseline"], -0.03)
    assert math.isclose(a["seconds"], 15.0)
    # One split: a difference, but no standard error.
    assert math.isclose(by_name["b"]["vs_baseline"], 0.05)
    assert math.isnan(by_name["b"]["vs_baseline_se"])
    assert by_name[BASELINE]["vs_baseline"] == 0.0


def test_prepare_only_writes_disjoint_splits_and_the_recipe(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--prepare-only", "--data", str(data), "--splits", "2"]
    assert main([*args, "--test-rows", "100", "--train-rows", "300"]) == 0
    recipe = json.loads((data / "recipe.json").read_text())
    assert recipe["base_model"].startswith("scratch:") and recipe["epochs"] >= 1
    tests = []
    for s in (1, 2):
        train, test = read_tsv(data / f"s{s}" / "train.tsv"), read_tsv(data / f"s{s}" / "test.tsv")
        assert (len(train), len(test)) == (300, 100)
        assert not set(train.texts) & set(test.texts)
        tests.append(set(test.texts))
    # Other split seeds, other test sets.
    assert tests[0] != tests[1]
