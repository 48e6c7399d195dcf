"""ONNX export: the contract, agreement with PyTorch, failing checks, wrong inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.common import StepError
from pipeline.contract import META_FILE, ONNX_FILE, ModelMeta
from pipeline.corpus import Splits
from pipeline.export import compare_logits, export_onnx, main
from pipeline.modeling import load_model
from pipeline.preprocess import encode, load_tokenizer
from tests.pipeline.onnx_helpers import io_signature, ort_logits, real_sentences

INT64, FLOAT = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def random_onnx(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("random_onnx")
    export_onnx(random_model_dir, out)
    return out


@pytest.fixture(scope="module")
def trained_export(
    trained_tiny_model: Path, small_splits: Splits, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trained_onnx")
    result = export_onnx(trained_tiny_model, out, check_texts=real_sentences(small_splits, 64))
    return out, result.metrics


def test_contract_names_types_and_dynamic_axes(random_onnx: Path) -> None:
    sig = io_signature(random_onnx / ONNX_FILE)
    assert sig == {
        "input_ids": (INT64, ["batch", "sequence"]),
        "attention_mask": (INT64, ["batch", "sequence"]),
        "token_type_ids": (INT64, ["batch", "sequence"]),
        "logits": (FLOAT, ["batch", 2]),
    }
    # One self-contained file: no external data next to it.
    assert not [p for p in random_onnx.iterdir() if p.suffix in {".data", ".bin", ".safetensors"}]
    meta = ModelMeta.load(random_onnx)
    assert (meta.format, meta.max_length, meta.num_labels) == ("onnx", 64, 2)
    assert meta.extra["exporter"] == "torchscript"
    id2label = json.loads((random_onnx / "config.json").read_text())["id2label"]
    assert id2label == {"0": "0", "1": "1"}
    assert load_tokenizer(random_onnx)("好")["input_ids"]


def test_metrics_recorded(trained_export: tuple[Path, dict]) -> None:
    _, metrics = trained_export
    assert metrics["exporter"] == "torchscript"
    assert metrics["opset"] == 17
    assert metrics["check_texts"] == 64
    assert metrics["max_abs_logit_diff"] <= 1e-3
    assert metrics["label_agreement"] == 1.0
    assert metrics["onnx_size_bytes"] > 100_000
    assert metrics["latency_ms_batch1_onnx"] > 0 and metrics["latency_ms_batch1_pytorch"] > 0
    # The check itself ran batch 1 and padded batches of other lengths than the trace example.
    assert set(metrics["check_batch_sizes"]) >= {1, 8}
    low, high = metrics["check_seq_len_range"]
    assert 3 <= low < high <= 64


@pytest.mark.parametrize(("batch", "pad_to"), [(1, None), (3, None), (16, None), (5, 64), (2, 7)])
def test_ort_matches_pytorch_on_real_sentences(
    trained_tiny_model: Path,
    trained_export: tuple[Path, dict],
    small_splits: Splits,
    batch: int,
    pad_to: int | None,
) -> None:
    out, _ = trained_export
    texts = real_sentences(small_splits, 200)[100 : 100 + batch]
    tok = load_tokenizer(out)
    model = load_model(trained_tiny_model).eval()
    feed = encode(tok, texts, 64, pad_to=pad_to)
    with torch.inference_mode():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    got = ort_logits(out / ONNX_FILE, tok, texts, 64, pad_to=pad_to)
    assert got.shape == (batch, 2)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_failing_check_raises(random_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"ONNX check failed: max abs logit difference .* > atol"):
        export_onnx(random_model_dir, tmp_path / "out", atol=1e-12)
    # No textcls.json: a failed export is not a loadable model folder.
    assert not (tmp_path / "out" / META_FILE).exists()


def test_non_pytorch_input_raises(random_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(StepError, match="export needs a pytorch model, got onnx"):
        export_onnx(random_onnx, tmp_path / "out")


def test_folder_without_meta_raises(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"no textcls\.json"):
        export_onnx(tmp_path, tmp_path / "out")


def test_pruned_folder_exports(
    trained_tiny_model: Path, small_splits: Splits, tmp_path: Path
) -> None:
    """A pruned BERT (own model_type, attention narrower than hidden) exports and checks."""
    import pipeline.prune as prune
    from pipeline.modeling import save_model_folder

    model = load_model(trained_tiny_model)
    layers = model.config.num_hidden_layers
    ffn = model.config.intermediate_size
    keep_heads = [torch.arange(4) for _ in range(layers)]
    keep_ffn = [torch.arange(ffn // 2) for _ in range(layers)]
    pruned = prune.prune_model(model, keep_heads, keep_ffn)
    src = save_model_folder(
        pruned, load_tokenizer(trained_tiny_model), tmp_path / "pruned", ModelMeta("pytorch", 64, 2)
    )
    result = export_onnx(src, tmp_path / "onnx", check_texts=real_sentences(small_splits, 32))
    assert result.metrics["max_abs_logit_diff"] <= 1e-3
    assert result.metrics["label_agreement"] == 1.0


def test_cli(random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(random_model_dir), "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out)["exporter"] == "torchscript"
    assert main(["--model", str(tmp_path / "o"), "--out", str(tmp_path / "p")]) == 2


def test_compare_logits_forgives_near_ties_only() -> None:
    """A flip within the conversion's typical logit change is rounding; a clear flip is not."""
    ref = np.array([[0.0, 1.0], [0.5000, 0.5005], [2.0, -2.0]])
    same = compare_logits(ref, ref + 1e-4)  # an even shift keeps every label
    assert same["label_agreement"] == 1.0 and same["near_tie_flips"] == 0
    noisy = ref + np.array([1e-3, -1e-3])  # flips the near tie (margin 5e-4) only
    check = compare_logits(ref, noisy)
    assert check["label_agreement"] == 1.0 and check["near_tie_flips"] == 1
    clear_flip = ref + 1e-4
    clear_flip[2] = [-2.0, 2.0]
    assert compare_logits(ref, clear_flip)["label_agreement"] == pytest.approx(2 / 3)
