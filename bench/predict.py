"""Batch scoring (``pipeline.predict``) against the ``evaluate`` step's batch throughput.

The ``predict`` job must score at least 0.8x as many sentences per second as
``evaluate`` measures for the same model (its ``throughput_per_s``: length-
grouped batches of 32 over the whole set, tokenization included, file reading
and the warm-up batch excluded). Here both run on the same models of the
cached chain and the same sentences, one thread, in interleaved rounds; the
predict figure is over its whole run (reading the file, tokenizing, the model,
writing the TSV), so the comparison is the conservative one.

    .venv/bin/python -m bench.predict [--quick] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.chain import PRESETS, add_chain_arguments, build_chain
from bench.common import environment, median, report, rotated, setup_logging, spread
from pipeline.data import read_tsv
from pipeline.evaluate import evaluate
from pipeline.predict import predict

log = logging.getLogger("bench.predict")

MODELS = ("teacher", "onnx", "int8")
TARGET_RATIO = 0.8


def _sentences(test: Path, dest: Path, rows: int) -> Path:
    """A labelled file of ``rows`` sentences (the test split repeated), for both steps."""
    data = read_tsv(test)
    with dest.open("w", encoding="utf-8") as f:
        f.write("index\tsentence\tlabel\n")
        for i in range(rows):
            k = i % len(data)
            f.write(f"{i}\t{data.texts[k]}\t{data.labels[k]}\n")
    return dest


def _measure(model: Path, data: Path, out: Path, batch_size: int, threads: int) -> dict[str, float]:
    ev = evaluate(model, data, batch_size=batch_size, latency_runs=0, device="cpu", threads=threads)
    pr = predict(model, data, out, batch_size=batch_size, device="cpu", threads=threads)
    return {"evaluate": float(ev["throughput_per_s"]), "predict": float(pr["throughput_per_s"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    chain = build_chain(
        PRESETS[args.chain or ("quick" if args.quick else "default")],
        args.workdir,
        steps=list(MODELS),
        threads=args.train_threads,
    )
    rows = args.rows or (2000 if args.quick else 10000)
    rounds = args.rounds or (2 if args.quick else 3)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        data = _sentences(chain.test, Path(tmp) / "sentences.tsv", rows)
        for r in range(rounds):
            for name in rotated(MODELS, r):
                got = _measure(chain.folder(name), data, Path(tmp) / "p.tsv", 32, args.threads)
                log.info("round %d %s: %s", r, name, got)
                runs[name].append(got)
    models: dict[str, Any] = {}
    for name, values in runs.items():
        ev = median(v["evaluate"] for v in values)
        pr = median(v["predict"] for v in values)
        models[name] = {
            "evaluate_per_s": ev,
            "predict_per_s": pr,
            "ratio": pr / ev,
            "evaluate_spread": spread([v["evaluate"] for v in values]),
            "predict_spread": spread([v["predict"] for v in values]),
            "runs": values,
        }
    return {
        "benchmark": "predict",
        "rows": rows,
        "rounds": rounds,
        "threads": args.threads,
        "batch_size": 32,
        "target_ratio": TARGET_RATIO,
        "chain": chain.describe(),
        "models": models,
        "meets_target": all(m["ratio"] >= TARGET_RATIO for m in models.values()),
        "environment": environment(),
    }


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    rows = [
        [name, m["evaluate_per_s"], m["predict_per_s"], m["ratio"], m["predict_spread"]]
        for name, m in result["models"].items()
    ]
    title = (
        f"predict vs evaluate throughput, sentences/s ({result['rows']} rows, batch 32, "
        f"{result['threads']} thread, median of {result['rounds']} rounds; target ratio "
        f">= {result['target_ratio']})"
    )
    return [(title, ["model", "evaluate", "predict", "ratio", "predict spread"], rows)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_chain_arguments(p)
    p.add_argument("--quick", action="store_true", help="the quick chain, 2000 rows, 2 rounds")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the models")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    setup_logging()
    result = run(args)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
