"""Structured pruning: real smaller models that reload, fine-tune and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.common import StepError
from pipeline.contract import ModelMeta
from pipeline.corpus import Splits
from pipeline.data import read_tsv, write_tsv
from pipeline.modeling import load_model
from pipeline.preprocess import encode, load_tokenizer
from pipeline.prune import PruneResult, main, prune, prune_model, resolve_targets
from pipeline.pruned_bert import PRUNED_MODEL_TYPE, PrunedBertForSequenceClassification

MAX_LENGTH = 32


def _logits(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    enc = encode(tokenizer, texts, MAX_LENGTH)
    with torch.no_grad():
        out = model.eval()(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits
    return np.asarray(out.numpy())


@pytest.fixture(scope="module")
def pruned(
    random_model_dir: Path, small_splits: Splits, tmp_path_factory: pytest.TempPathFactory
) -> PruneResult:
    """scratch:tiny (6 heads, FFN 384) pruned with the default targets (8 heads, FFN 2048)."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    return prune(random_model_dir, small_splits.dev, out, max_length=MAX_LENGTH, seed=0)


@pytest.fixture(scope="module")
def texts(small_splits: Splits) -> list[str]:
    return read_tsv(small_splits.test).texts[:12]


def test_targets_scale_for_models_smaller_than_the_seed() -> None:
    # bert-base gets the seed's numbers; bigger models are cut to them.
    assert resolve_targets(12, 3072, 8, 2048) == (8, 2048)
    assert resolve_targets(16, 4096, 8, 2048) == (8, 2048)
    # At or below a target: the seed's ratio (8/12, 2048/3072), rounded, at least 1.
    assert resolve_targets(6, 384, 8, 2048) == (4, 256)
    assert resolve_targets(8, 2048, 8, 2048) == (5, 1365)
    assert resolve_targets(1, 1, 8, 2048) == (1, 1)
    # Each dimension on its own: heads above target, FFN below.
    assert resolve_targets(12, 1536, 8, 2048) == (8, 1024)
    with pytest.raises(StepError):
        resolve_targets(12, 3072, 0, 2048)


def test_pruned_model_has_target_shapes(pruned: PruneResult) -> None:
    from safetensors import safe_open

    m = pruned.metrics
    assert (m["heads_before"], m["heads_after"]) == (6, 4)
    assert (m["ffn_before"], m["ffn_after"]) == (384, 256)
    assert m["requested"] == {"target_heads": 8, "target_ffn": 2048}
    cfg = json.loads((pruned.model_dir / "config.json").read_text())
    assert cfg["model_type"] == PRUNED_MODEL_TYPE
    assert cfg["num_attention_heads"] == 4
    assert cfg["attention_head_size"] == 16  # 96 / 6: heads keep their width
    assert cfg["intermediate_size"] == 256
    assert cfg["num_hidden_layers"] == 4
    # The weights on disk really are smaller, layer by layer.
    with safe_open(str(pruned.model_dir / "model.safetensors"), framework="pt") as f:
        for i in range(4):
            p = f"bert.encoder.layer.{i}."
            for name in ("query", "key", "value"):
                assert f.get_slice(p + f"attention.self.{name}.weight").get_shape() == [64, 96]
                assert f.get_slice(p + f"attention.self.{name}.bias").get_shape() == [64]
            assert f.get_slice(p + "attention.output.dense.weight").get_shape() == [96, 64]
            assert f.get_slice(p + "intermediate.dense.weight").get_shape() == [256, 96]
            assert f.get_slice(p + "output.dense.weight").get_shape() == [96, 256]
    assert [len(h) for h in m["kept_heads"]] == [4, 4, 4, 4]


def test_metrics_show_a_smaller_model(pruned: PruneResult) -> None:
    m = pruned.metrics
    assert m["parameters_after"] < m["parameters_before"]
    assert m["size_bytes_after"] < m["size_bytes_before"]
    assert m["size_bytes_after"] == (pruned.model_dir / "model.safetensors").stat().st_size
    assert m["latency_before_ms"] > 0 and m["latency_after_ms"] > 0
    assert m["latency_sentences"] > 0
    for key in ("accuracy_before", "accuracy_after_prune", "accuracy_after"):
        assert 0.0 <= m[key] <= 1.0
    assert m["seconds"] > 0
    meta = ModelMeta.load(pruned.model_dir)
    assert meta.format == "pytorch"
    assert meta.num_labels == 2
    assert meta.extra["pruned_from"]


def test_reload_gives_the_in_memory_logits(pruned: PruneResult, texts: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    expected = _logits(pruned.model, pruned.tokenizer, texts)
    tok = load_tokenizer(pruned.model_dir)
    auto = AutoModelForSequenceClassification.from_pretrained(str(pruned.model_dir))
    assert isinstance(auto, PrunedBertForSequenceClassification)
    np.testing.assert_allclose(_logits(auto, tok, texts), expected, atol=1e-5)
    ours = load_model(pruned.model_dir)
    np.testing.assert_allclose(_logits(ours, tok, texts), expected, atol=1e-5)


def test_pruning_equals_masking_the_removed_units(random_model_dir: Path, texts: list[str]) -> None:
    """Slicing is exact: the small model computes what the big one does with units masked."""
    model = load_model(random_model_dir).eval()
    tok = load_tokenizer(random_model_dir)
    gen = torch.Generator().manual_seed(3)
    keep_heads = [torch.sort(torch.randperm(6, generator=gen)[:4]).values for _ in range(4)]
    keep_ffn = [torch.sort(torch.randperm(384, generator=gen)[:200]).values for _ in range(4)]
    small = prune_model(model, keep_heads, keep_ffn)

    handles = []
    for layer, heads, ffn in zip(model.bert.encoder.layer, keep_heads, keep_ffn, strict=True):
        head_mask = torch.zeros(6)
        head_mask[heads] = 1
        ffn_mask = torch.zeros(384)
        ffn_mask[ffn] = 1
        per_dim = head_mask.repeat_interleave(16)
        handles.append(
            layer.attention.self.register_forward_hook(
                lambda _m, _i, out, mask=per_dim: (out[0] * mask, *out[1:])
            )
        )
        handles.append(
            layer.intermediate.register_forward_hook(lambda _m, _i, out, mask=ffn_mask: out * mask)
        )
    masked = _logits(model, tok, texts)
    for h in handles:
        h.remove()
    np.testing.assert_allclose(_logits(small, tok, texts), masked, atol=1e-5)
    assert not np.allclose(_logits(model, tok, texts), masked, atol=1e-3)


def test_pruned_model_exports_to_onnx(
    pruned: PruneResult, texts: list[str], tmp_path: Path
) -> None:
    import onnxruntime as ort

    model = load_model(pruned.model_dir).eval()
    tok = load_tokenizer(pruned.model_dir)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).logits

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = encode(tok, texts[:2], MAX_LENGTH)
    path = tmp_path / "model.onnx"
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            LogitsOnly(model).eval(),
            tuple(torch.from_numpy(example[n]) for n in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = encode(tok, texts, MAX_LENGTH)  # another batch size and length than the example
    got = sess.run(["logits"], enc)[0]
    np.testing.assert_allclose(got, _logits(model, tok, texts), atol=1e-4)


def test_cli_prunes_a_pruned_model_again_and_fine_tunes(
    pruned: PruneResult,
    small_splits: Splits,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    texts: list[str],
) -> None:
    out = tmp_path / "again"
    rc = main(
        [
            "--model", str(pruned.model_dir),
            "--data", str(small_splits.dev),
            "--out", str(out),
            "--epochs", "1",
            "--max-length", str(MAX_LENGTH),
        ]
    )  # fmt: skip
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    # 4 heads and FFN 256 are below the targets, so the seed's ratio applies again.
    assert (m["heads_after"], m["ffn_after"]) == (3, 171)
    assert m["fine_tune"]["epochs"] == 1
    assert len(m["fine_tune"]["history"]) == 1
    assert 0.0 <= m["accuracy_after_fine_tune"] <= 1.0
    assert m["accuracy_on"].startswith("held-out")
    model = load_model(out)
    assert model.config.num_attention_heads == 3
    assert model.config.intermediate_size == 171
    assert _logits(model, load_tokenizer(out), texts).shape == (len(texts), 2)


def test_non_pytorch_model_is_refused(
    random_model_dir: Path, small_splits: Splits, tmp_path: Path
) -> None:
    folder = tmp_path / "int8"
    shutil.copytree(random_model_dir, folder)
    meta = ModelMeta.load(folder)
    meta.format = "onnx-int8"
    meta.save(folder)
    with pytest.raises(StepError, match="prune needs a pytorch model, got onnx-int8"):
        prune(folder, small_splits.dev, tmp_path / "out")
    (folder / "textcls.json").unlink()
    with pytest.raises(StepError, match="not a textcls model folder"):
        prune(folder, small_splits.dev, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_beyond_the_model_are_refused(random_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "three.tsv"
    write_tsv(data, ["很好", "很差", "一般"], [0, 1, 2])
    with pytest.raises(StepError, match=r"labels \[2\] but the model has 2"):
        prune(random_model_dir, data, tmp_path / "out")
