"""fp16 step: ORT fusion counts, CPU execution, the io contract, agreement with the parent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.common import StepError
from pipeline.contract import ONNX_FILE, ModelMeta
from pipeline.corpus import Splits
from pipeline.export import export_onnx
from pipeline.optimize import OptimizeResult, main, to_fp16
from pipeline.preprocess import load_tokenizer
from tests.pipeline.onnx_helpers import (
    io_signature,
    ort_logits,
    pruned_onnx_folder,
    real_sentences,
    relabel,
)

INT64, FLOAT = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def random_onnx(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("random_onnx")
    export_onnx(random_model_dir, out)
    return out


@pytest.fixture(scope="module")
def random_fp16(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> OptimizeResult:
    return to_fp16(random_onnx, tmp_path_factory.mktemp("random_fp16"))


def test_fusion_counts_recorded(random_fp16: OptimizeResult) -> None:
    fused = random_fp16.metrics["fused_operators"]
    # scratch:tiny has 4 layers: one Attention, two SkipLayerNorms, one BiasGelu each.
    assert fused["Attention"] == 4
    assert fused["EmbedLayerNormalization"] == 1
    assert fused["SkipLayerNormalization"] == 8
    assert fused["BiasGelu"] == 4
    ops = Counter(n.op_type for n in onnx.load(str(random_fp16.model_dir / ONNX_FILE)).graph.node)
    assert ops["Attention"] == 4 and ops["EmbedLayerNormalization"] == 1
    assert random_fp16.metrics["attention_num_heads"] == 6
    assert random_fp16.metrics["attention_hidden_size"] == 96
    assert random_fp16.metrics["attention_shape_source"] == "graph"


def test_runs_on_cpu_with_contract_io(random_fp16: OptimizeResult, random_model_dir: Path) -> None:
    path = random_fp16.model_dir / ONNX_FILE
    assert io_signature(path) == {
        "input_ids": (INT64, ["batch", "sequence"]),
        "attention_mask": (INT64, ["batch", "sequence"]),
        "token_type_ids": (INT64, ["batch", "sequence"]),
        "logits": (FLOAT, ["batch", 2]),
    }
    dtypes = Counter(i.data_type for i in onnx.load(str(path)).graph.initializer)
    assert dtypes[onnx.TensorProto.FLOAT16] > dtypes[onnx.TensorProto.FLOAT]
    tok = load_tokenizer(random_fp16.model_dir)
    for texts in (["好"], ["这个东西很好用", "差评", "物流很快，包装也很严实，下次还会再来"]):
        logits = ort_logits(path, tok, texts, 64)
        assert logits.dtype == np.float32 and logits.shape == (len(texts), 2)
        assert np.isfinite(logits).all()
    meta = ModelMeta.load(random_fp16.model_dir)
    assert (meta.format, meta.max_length, meta.num_labels) == ("onnx-fp16", 64, 2)
    m = random_fp16.metrics
    assert m["runs_on_cpu"] is True
    assert m["check_provider"] == ("CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider")
    # ORT 1.32 runs most fused fp16 ops on a CPU through inserted Casts.
    assert m["cpu_inserted_casts"] > 0
    assert m["size_ratio"] < 0.6


def test_labels_agree_with_parent_on_real_sentences(
    trained_tiny_onnx: Path, small_splits: Splits, tmp_path: Path
) -> None:
    texts = real_sentences(small_splits, 200)
    parent = trained_tiny_onnx
    result = to_fp16(parent, tmp_path / "fp16", check_texts=texts)
    assert result.metrics["check_texts"] == 200
    assert result.metrics["label_agreement"] == 1.0
    assert result.metrics["max_abs_logit_diff"] < 0.01
    # Independently of the step's own check: one padded batch of 32.
    tok = load_tokenizer(parent)
    ref = ort_logits(parent / ONNX_FILE, tok, texts[:32], 64)
    got = ort_logits(result.model_dir / ONNX_FILE, tok, texts[:32], 64)
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    np.testing.assert_allclose(got, ref, atol=0.01)


@pytest.mark.parametrize("fmt", ["pytorch", "onnx-fp16", "onnx-int8"])
def test_wrong_format_raises(random_onnx: Path, tmp_path: Path, fmt: str) -> None:
    src = relabel(random_onnx, tmp_path / "src", fmt)
    with pytest.raises(StepError, match=f"fp16 needs an onnx model, got {fmt}"):
        to_fp16(src, tmp_path / "out")


def test_gross_disagreement_fails(random_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(StepError, match="fp16 check failed"):
        to_fp16(random_onnx, tmp_path / "out", max_abs_diff=0.0)


@pytest.mark.parametrize(
    ("heads", "attention", "source"), [([4, 4, 4, 4], 4, "graph"), ([4, 6, 6, 6], 0, "mixed")]
)
def test_pruned_heads_read_from_graph(
    random_model_dir: Path, tmp_path: Path, heads: list[int], attention: int, source: str
) -> None:
    """config.json says 6 heads; the graph has fewer: fusion must follow the graph."""
    parent = pruned_onnx_folder(random_model_dir, tmp_path / "pruned", heads)
    result = to_fp16(parent, tmp_path / "fp16")
    assert result.metrics["fused_operators"]["Attention"] == attention
    assert result.metrics["attention_shape_source"] == source
    if attention:
        assert result.metrics["attention_num_heads"] == 4
        assert result.metrics["attention_hidden_size"] == 64
    tok = load_tokenizer(parent)
    texts = ["这个东西很好用，质量不错", "差评", "物流很快，包装也很严实"]
    ref = ort_logits(parent / ONNX_FILE, tok, texts, 64)
    got = ort_logits(result.model_dir / ONNX_FILE, tok, texts, 64)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_use_gpu_checks_on_the_provider_present(random_onnx: Path, tmp_path: Path) -> None:
    """use_gpu=True checks on CUDA where ONNX Runtime has it, else falls back to the CPU."""
    result = to_fp16(random_onnx, tmp_path / "out", use_gpu=True)
    expected = "CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider"
    assert result.metrics["check_provider"] == expected


def test_cli(random_onnx: Path, random_model_dir: Path, tmp_path: Path) -> None:
    assert main(["--model", str(random_onnx), "--out", str(tmp_path / "o"), "--cpu"]) == 0
    assert ModelMeta.load(tmp_path / "o").format == "onnx-fp16"
    assert main(["--model", str(random_model_dir), "--out", str(tmp_path / "p")]) == 2
