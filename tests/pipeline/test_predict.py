"""``pipeline.predict``: the predictions TSV, its streaming memory, cancel, the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import JobCancelled
from pipeline.corpus import Splits
from pipeline.data import read_tsv
from pipeline.predict import OUTPUT_HEADER, predict
from pipeline.runtime import load_predictor


def _unlabelled(src: Path, dest: Path, repeat: int = 1) -> Path:
    texts = read_tsv(src).texts
    with dest.open("w", encoding="utf-8") as f:
        f.write("index\tsentence\n")
        for k in range(repeat):
            f.writelines(f"{k}-{i}\t{t}\n" for i, t in enumerate(texts))
    return dest


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_predictions_match_the_predictor(
    trained_tiny_onnx: Path, small_splits: Splits, tmp_path: Path
) -> None:
    out = tmp_path / "p.tsv"
    # A labelled file: its labels are ignored; a small chunk crosses chunk borders.
    metrics = predict(trained_tiny_onnx, small_splits.test, out, chunk_rows=37, threads=1)
    data = read_tsv(small_splits.test)
    rows = _rows(out)
    assert tuple(rows[0]) == OUTPUT_HEADER
    assert [r[0] for r in rows[1:]] == data.indices
    assert [r[1] for r in rows[1:]] == data.texts
    assert metrics["rows"] == len(data) and metrics["throughput_per_s"] > 0
    predictor = load_predictor(trained_tiny_onnx, device="cpu", threads=1)
    ids, probs = predictor.predict(data.texts)
    assert [int(r[2]) for r in rows[1:]] == ids.tolist()
    assert [r[3] for r in rows[1:]] == [predictor.label_names[i] for i in ids]
    np.testing.assert_allclose([float(r[4]) for r in rows[1:]], probs, atol=1e-5)


def _peak_bytes(model: Path, data: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        predict(model, data, out, chunk_rows=64, threads=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(
    trained_tiny_onnx: Path, small_splits: Splits, tmp_path: Path
) -> None:
    # Both files span many chunks, so both peaks hold one full chunk.
    small = _unlabelled(small_splits.test, tmp_path / "small.tsv", repeat=4)
    big = _unlabelled(small_splits.test, tmp_path / "big.tsv", repeat=48)
    _peak_bytes(trained_tiny_onnx, small, tmp_path / "warm.tsv")  # lazy imports, caches
    peak_small = _peak_bytes(trained_tiny_onnx, small, tmp_path / "s.tsv")
    peak_big = _peak_bytes(trained_tiny_onnx, big, tmp_path / "b.tsv")
    assert len(_rows(tmp_path / "b.tsv")) - 1 == 12 * (len(_rows(tmp_path / "s.tsv")) - 1)
    # Twelve times the rows; reading it whole would need ~12x the text in memory.
    growth = 0.3 * peak_small + 128 * 1024
    assert peak_big - peak_small < growth, (peak_small, peak_big)
    # The bound could catch a whole read: the extra text is far more than it allows.
    extra = big.stat().st_size - small.stat().st_size
    assert extra > 2 * growth, (extra, growth)


def test_progress_can_cancel(trained_tiny_onnx: Path, small_splits: Splits, tmp_path: Path) -> None:
    calls: list[float] = []

    def progress(fraction: float, stage: str | None = None) -> None:
        calls.append(fraction)
        if len(calls) == 3:
            raise JobCancelled("stop")

    with pytest.raises(JobCancelled):
        predict(trained_tiny_onnx, small_splits.test, tmp_path / "p.tsv", chunk_rows=20,
                progress=progress)  # fmt: skip
    assert calls[1] < calls[2] < 1.0


def test_cli(trained_tiny_onnx: Path, small_splits: Splits, tmp_path: Path) -> None:
    out = tmp_path / "cli.tsv"
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", str(trained_tiny_onnx),
         "--data", str(small_splits.test), "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"] == len(_rows(out)) - 1
