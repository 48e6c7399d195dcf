"""The shared inference runtime on real trained models, PyTorch and ONNX."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common import StepError
from pipeline.contract import ModelMeta
from pipeline.corpus import Splits
from pipeline.data import read_tsv
from pipeline.modeling import copy_tokenizer_and_meta, load_model
from pipeline.preprocess import encode, load_tokenizer
from pipeline.runtime import CPU_DISABLED_OPTIMIZERS, Predictor, load_predictor

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def texts(small_splits: Splits) -> list[str]:
    return read_tsv(small_splits.test).texts[:120]


@pytest.fixture(scope="module")
def torch_predictor(trained_tiny_model: Path) -> Predictor:
    return load_predictor(trained_tiny_model, device="cpu")


@pytest.fixture(scope="module")
def onnx_predictor(trained_tiny_onnx: Path) -> Predictor:
    return load_predictor(trained_tiny_onnx, device="cpu", threads=1)


def test_pytorch_predictor_equals_model(
    torch_predictor: Predictor, trained_tiny_model: Path, texts: list[str]
) -> None:
    assert torch_predictor.format == "pytorch"
    assert torch_predictor.device == "cpu"
    assert (torch_predictor.num_labels, torch_predictor.max_length) == (2, 64)
    assert torch_predictor.model_dir == trained_tiny_model

    model = load_model(trained_tiny_model).eval()
    enc = encode(load_tokenizer(trained_tiny_model), texts[:32], 64)
    with torch.inference_mode():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    got = torch_predictor.predict_logits(texts[:32])
    assert got.dtype == np.float32 and got.shape == (32, 2)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(torch_predictor.predict_encoded(enc), ref, atol=1e-5)


def test_onnx_predictor_agrees_with_pytorch(
    onnx_predictor: Predictor, torch_predictor: Predictor, texts: list[str]
) -> None:
    assert onnx_predictor.format == "onnx" and onnx_predictor.device == "cpu"
    assert onnx_predictor.num_labels == 2
    got = onnx_predictor.predict_logits(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 2)
    np.testing.assert_allclose(got, torch_predictor.predict_logits(texts), atol=1e-4)


def test_predict_labels_and_probabilities(torch_predictor: Predictor, texts: list[str]) -> None:
    labels, probs = torch_predictor.predict(texts)
    assert labels.shape == probs.shape == (len(texts),)
    assert labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1}
    assert probs.dtype == np.float32
    assert np.all(probs > 0.5 - 1e-6) and np.all(probs <= 1.0)
    logits = torch_predictor.predict_logits(texts)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    empty = torch_predictor.predict_logits([])
    assert empty.shape == (0, 2)


def _optimized_op_types(model: Path, out: Path, disabled: list[str]) -> list[str]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(
        str(model), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def test_cpu_sessions_skip_skiplayernorm_fusion(
    tmp_path: Path, trained_tiny_onnx: Path, texts: list[str]
) -> None:
    """CPU sessions leave SkipLayerNormFusion off (it fires on the int8 graph), same logits."""
    from pipeline.quantize import quantize_int8

    int8 = quantize_int8(trained_tiny_onnx, tmp_path / "int8").model_dir
    shipped = load_predictor(int8, device="cpu", threads=1)
    assert shipped.disabled_optimizers == CPU_DISABLED_OPTIMIZERS
    # The premise: ORT fuses the int8 graph's Add + LayerNormalization unless told not to.
    onnx_file = int8 / "model.onnx"
    fused = _optimized_op_types(onnx_file, tmp_path / "all.onnx", [])
    unfused = _optimized_op_types(onnx_file, tmp_path / "off.onnx", list(CPU_DISABLED_OPTIMIZERS))
    assert fused.count("SkipLayerNormalization") > 0
    assert unfused.count("SkipLayerNormalization") == 0
    full = load_predictor(int8, device="cpu", threads=1, disabled_optimizers=())
    assert full.disabled_optimizers == ()
    # The kernels round differently, and int8 activations are quantized per call, so a rare
    # element lands one int8 step away (measured up to 2.1e-3 on logits of scale ~1, where one
    # step is ~1/127): most logits agree to float precision, none by more than a step.
    diff = np.abs(shipped.predict_logits(texts) - full.predict_logits(texts))
    assert np.median(diff) <= 1e-5
    assert diff.max() <= 1e-2
    assert (shipped.predict(texts)[0] == full.predict(texts)[0]).mean() >= 0.99


def test_long_lists_are_chunked_in_order(onnx_predictor: Predictor, texts: list[str]) -> None:
    # 120 texts > one chunk: results must come back in input order.
    whole = onnx_predictor.predict_logits(texts, chunk_size=16)
    singles = np.concatenate([onnx_predictor.predict_logits([t]) for t in texts[:20]])
    np.testing.assert_allclose(whole[:20], singles, atol=1e-4)


@pytest.mark.parametrize("which", ["torch_predictor", "onnx_predictor"])
def test_concurrent_calls_agree(
    which: str, request: pytest.FixtureRequest, texts: list[str]
) -> None:
    predictor: Predictor = request.getfixturevalue(which)
    chunks = [texts[i : i + 7] for i in range(0, 84, 7)]
    expected = [predictor.predict(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(predictor.predict, chunks * 2))
    for (labels, probs), (exp_labels, exp_probs) in zip(got, expected * 2, strict=True):
        np.testing.assert_array_equal(labels, exp_labels)
        np.testing.assert_allclose(probs, exp_probs, atol=1e-5)


def test_int8_variant_loads(
    tmp_path: Path, trained_tiny_onnx: Path, torch_predictor: Predictor, texts: list[str]
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path / "int8"
    copy_tokenizer_and_meta(trained_tiny_onnx, out)
    quantize_dynamic(
        str(trained_tiny_onnx / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8
    )
    ModelMeta("onnx-int8", max_length=64, num_labels=2).save(out)
    pred = load_predictor(out, device="cpu", threads=1)
    assert pred.format == "onnx-int8"
    labels, _ = pred.predict(texts)
    ref, _ = torch_predictor.predict(texts)
    assert (labels == ref).mean() >= 0.9


def test_fp16_variant_loads(
    tmp_path: Path, trained_tiny_onnx: Path, torch_predictor: Predictor, texts: list[str]
) -> None:
    from pipeline.optimize import to_fp16

    out = to_fp16(trained_tiny_onnx, tmp_path / "fp16", use_gpu=False).model_dir
    pred = load_predictor(out, device="cpu", threads=1)
    assert pred.format == "onnx-fp16"
    got = pred.predict_logits(texts)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch_predictor.predict_logits(texts), atol=2e-2)


def test_bad_folders(tmp_path: Path, trained_tiny_model: Path) -> None:
    with pytest.raises(StepError, match="not a textcls model folder"):
        load_predictor(tmp_path)
    onnx_dir = tmp_path / "onnx"
    copy_tokenizer_and_meta(trained_tiny_model, onnx_dir)
    ModelMeta("onnx", max_length=64, num_labels=2).save(onnx_dir)
    with pytest.raises(StepError, match=r"has no model\.onnx"):
        load_predictor(onnx_dir)
    weird = tmp_path / "weird"
    shutil.copytree(onnx_dir, weird)
    ModelMeta("tensorrt", max_length=64, num_labels=2).save(weird)
    with pytest.raises(StepError, match="unknown model format"):
        load_predictor(weird)
    with pytest.raises(StepError, match="unknown device"):
        load_predictor(trained_tiny_model, device="tpu")


def test_cuda_request(trained_tiny_model: Path, trained_tiny_onnx: Path) -> None:
    """Asking for CUDA runs on CUDA where it exists, and is a clear error where not."""
    import onnxruntime as ort

    if torch.cuda.is_available():
        assert load_predictor(trained_tiny_model, device="cuda").device.startswith("cuda")
    else:
        with pytest.raises(StepError, match="CUDA"):
            load_predictor(trained_tiny_model, device="cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert load_predictor(trained_tiny_onnx, device="cuda").device.startswith("cuda")
    else:
        with pytest.raises(StepError, match="CUDA"):
            load_predictor(trained_tiny_onnx, device="cuda")
