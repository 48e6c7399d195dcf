"""Step ``evaluate``: quality, speed and size of any model folder on one dataset.

Everything runs through :func:`pipeline.runtime.load_predictor`, so PyTorch and
every ONNX variant are measured the same way, with the same preprocessing the
inference workers use. Latency and throughput include tokenization, as a
caller of ``POST /predict`` would see them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import ProgressFn, StepError, no_progress, run_cli_step
from pipeline.contract import META_FILE, ModelMeta
from pipeline.data import read_tsv
from pipeline.metrics import classification_metrics
from pipeline.preprocess import length_grouped_batches
from pipeline.runtime import load_predictor, torch_threads

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".onnx_data", ".pt", ".pth")
LATENCY_WARMUP = 5
LATENCY_SEED = 0


def model_size_bytes(model_dir: Path) -> int:
    """Bytes of weight files (safetensors, bin, onnx and external data) in a model folder."""
    return sum(
        p.stat().st_size
        for p in Path(model_dir).rglob("*")
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def _check_labels(data_labels: list[int], num_labels: int) -> None:
    if data_labels and data_labels[-1] >= num_labels:
        raise StepError(
            f"dataset has labels {data_labels} but model has {num_labels} labels "
            f"(0..{num_labels - 1})"
        )


def _latency(predictor: Any, texts: Sequence[str], runs: int) -> dict[str, float]:
    """Batch-1 latency in ms over ``runs`` real sentences, after a short warm-up."""
    rng = np.random.default_rng(LATENCY_SEED)
    # A seeded sample (with replacement only if the set is smaller than runs)
    # so short and long sentences are both represented, run after run.
    picks = rng.choice(len(texts), size=runs, replace=runs > len(texts))
    for i in picks[:LATENCY_WARMUP]:
        predictor.predict_logits([texts[i]])
    predictor.synchronize()
    times = np.empty(runs, dtype=np.float64)
    for n, i in enumerate(picks):
        start = time.perf_counter()
        predictor.predict_logits([texts[i]])
        # On CUDA the clock stops when the device is done (torch.cuda.synchronize).
        predictor.synchronize()
        times[n] = (time.perf_counter() - start) * 1000.0
    return {
        "p50": float(np.percentile(times, 50)),
        "p99": float(np.percentile(times, 99)),
        "mean": float(times.mean()),
        "runs": runs,
    }


def evaluate(
    model_dir: Path,
    dataset_tsv: Path,
    *,
    batch_size: int = 32,
    latency_runs: int = 100,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1, confusion matrix, latency, throughput, size.

    ``latency_ms`` is batch 1 over ``latency_runs`` sentences of the set (0
    skips it); ``throughput_per_s`` is sentences per second over the whole set
    in length-grouped batches of ``batch_size``. ``threads``: CPU threads for
    the model (ONNX Runtime intra-op, or torch's, restored afterwards).
    """
    with torch_threads(threads):
        if batch_size < 1 or latency_runs < 0:
            raise StepError(
                f"batch_size must be >= 1 and latency_runs >= 0 (got {batch_size}, {latency_runs})"
            )
        model_dir = Path(model_dir)
        data = read_tsv(Path(dataset_tsv))
        if not data.labelled:
            raise StepError(f"{dataset_tsv} is unlabelled text; evaluation needs labels")
        data_labels = sorted(set(data.labels))
        if (model_dir / META_FILE).is_file():
            # Checked before loading the model: a mismatch should fail fast.
            _check_labels(data_labels, ModelMeta.load(model_dir).num_labels)
        progress(0.0, "loading model")
        predictor = load_predictor(model_dir, device=device, threads=threads)
        try:
            n_model = predictor.num_labels
            _check_labels(data_labels, n_model)

            # Length-grouped like training, so padding does not dominate the timing.
            lengths = predictor.token_lengths(data.texts)
            batches = length_grouped_batches(lengths, batch_size, shuffle=False)
            # One untimed batch first: the first call pays for lazy initialisation.
            predictor.predict_encoded(predictor.encode([data.texts[i] for i in batches[0]]))
            predictor.synchronize()
            logits = np.zeros((len(data), n_model), dtype=np.float32)
            start = time.perf_counter()
            for b, idx in enumerate(batches):
                logits[idx] = predictor.predict_encoded(
                    predictor.encode([data.texts[i] for i in idx])
                )
                if b % 5 == 0:
                    progress(0.05 + 0.75 * (b + 1) / len(batches), "predicting")
            predictor.synchronize()
            seconds = time.perf_counter() - start
            preds = logits.argmax(axis=1)
            scores = classification_metrics(
                data.labels, preds, max(n_model, data_labels[-1] + 1), predictor.label_names
            )

            latency: dict[str, float] | None = None
            if latency_runs:
                progress(0.8, "timing batch 1")
                latency = _latency(predictor, data.texts, latency_runs)
            result: dict[str, Any] = {
                **scores,
                "rows": len(data),
                "latency_ms": latency,
                "throughput_per_s": len(data) / seconds if seconds > 0 else float("inf"),
                "throughput_batch_size": batch_size,
                "size_bytes": model_size_bytes(model_dir),
                "format": predictor.format,
                "device": predictor.device,
                # CPU threads the model ran on (None: ONNX Runtime's default, one per core).
                "threads": _threads_used(predictor, threads),
                "num_labels": n_model,
            }
        finally:
            predictor.close()
        progress(1.0, None)
        log.info(
            "evaluated %s (%s on %s): accuracy %.4f, macro-F1 %.4f, p50 %s ms, %.1f sentences/s",
            model_dir,
            result["format"],
            result["device"],
            result["accuracy"],
            result["macro_f1"],
            f"{latency['p50']:.2f}" if latency else "-",
            result["throughput_per_s"],
        )
        return result


def _threads_used(predictor: Any, threads: int | None) -> int | None:
    if predictor.format == "pytorch" and predictor.device == "cpu":
        import torch

        return int(torch.get_num_threads())
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.evaluate --model DIR --data X.tsv``: prints the metrics as JSON."""
    p = argparse.ArgumentParser(description="Evaluate a textcls model folder on a TSV dataset.")
    p.add_argument("--model", type=Path, required=True, help="model folder (any format)")
    p.add_argument("--data", type=Path, required=True, help="TSV dataset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-runs", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: evaluate(
            args.model,
            args.data,
            batch_size=args.batch_size,
            latency_runs=args.latency_runs,
            device=args.device,
            threads=args.threads,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
