"""Step ``fp16``: ONNX Runtime's BERT graph fusion, then float16 weights and compute.

Input is an fp32 ``onnx`` folder (from :mod:`pipeline.export`), output an
``onnx-fp16`` folder that keeps the ONNX contract: int64 inputs and float32
``logits`` (``keep_io_types``), so callers never see half precision.

Attention fusion needs the real number of heads. The TorchScript export of
transformers 5 reshapes Q/K/V to ``[batch, seq, -1, head_size]``, so ORT's own
detection (``num_heads=0``) finds ``-1`` and fuses nothing; and a pruned model
has fewer heads than ``hidden_size / head_size``. :func:`attention_shape`
therefore reads heads and head size from the graph itself (the Q/K/V weight
width over the reshape's head size); with per-layer head counts that differ it
disables attention fusion rather than fuse a layer wrongly.

On a CPU the model runs but is not faster: ONNX Runtime 1.32 has CPU float16
kernels for few of these ops (``SkipLayerNormalization`` does; ``MatMul``,
``Attention``, ``EmbedLayerNormalization``, ``BiasGelu`` and ``Gemm`` do not),
so at session start it inserts Casts and computes those in float32. The count
of such Casts is recorded as ``cpu_inserted_casts``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import ProgressFn, StepError, no_progress, run_cli_step
from pipeline.contract import LOGITS, ONNX_FILE
from pipeline.export import (
    check_batches,
    check_contract,
    compare_logits,
    file_size,
    finish_onnx_folder,
    load_check_texts,
    median_latency_ms,
    onnx_logits,
    ort_session,
    require_format,
    resolve_check_texts,
)
from pipeline.preprocess import encode, load_tokenizer

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# fp16 keeps ~3 significant digits: on trained classifiers the logits move by
# ~1e-3..1e-2, so a label only flips for near-ties. A difference over 0.1 or
# agreement under 90% means a broken conversion, not rounding.
FP16_MAX_ABS_DIFF = 0.1
FP16_MIN_AGREEMENT = 0.9
FUSED_OP_TYPES = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)


@dataclass
class OptimizeResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionShape:
    """What ORT's attention fusion is told: heads per layer and their total width."""

    num_heads: int
    hidden_size: int
    source: str  # "graph", "config" or "mixed" (differing per-layer heads: fusion off)


def _constant(graph: Any, name: str, producers: dict[str, Any]) -> Any:
    """The numpy value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def attention_shape(model_path: Path, config: dict[str, Any]) -> AttentionShape:
    """Heads and attention width from the Q/K/V projections in the graph (see module doc)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    found: set[tuple[int, int]] = set()
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        shape = producers.get(node.input[1])
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        head_size = _constant(graph, shape.input[3], producers)
        if head_size is None or head_size.size != 1 or int(head_size.reshape(-1)[0]) <= 0:
            continue
        # Reshape(Add(MatMul(x, W), b)): the projection's output width is W's last dim.
        add = producers.get(node.input[0])
        if add is None or add.op_type != "Add":
            continue
        for operand in add.input:
            matmul = producers.get(operand)
            if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in weights:
                width = weights[matmul.input[1]][-1]
                size = int(head_size.reshape(-1)[0])
                if width % size == 0:
                    found.add((width // size, size))
    if len(found) == 1:
        heads, size = found.pop()
        return AttentionShape(heads, heads * size, "graph")
    if len(found) > 1:
        log.warning("per-layer head counts differ %s: attention fusion disabled", sorted(found))
        return AttentionShape(0, 0, "mixed")
    heads = int(config.get("num_attention_heads") or 0)
    hidden = int(config.get("hidden_size") or 0)
    size = int(config.get("attention_head_size") or (hidden // heads if heads else 0))
    return AttentionShape(heads, heads * size, "config")


class _DropPrunedWidthWarning(logging.Filter):
    """ORT warns when the attention width differs from the input width; for a pruned
    model that is expected (its docs: hidden_size is "the hidden dimension after pruning")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is not same as weight matrix dimension" not in record.getMessage()


def fuse_bert(
    model_path: Path, config: dict[str, Any], *, use_gpu: bool = False
) -> tuple[Any, AttentionShape]:
    """ORT's BERT fusion of ``model_path`` (an ``OnnxModel``) and the attention shape it used."""
    from onnxruntime.transformers.optimizer import optimize_model

    shape = attention_shape(model_path, config)
    fusion_log = logging.getLogger("fusion_attention")
    quiet = _DropPrunedWidthWarning()
    fusion_log.addFilter(quiet)
    try:
        model = optimize_model(
            str(model_path),
            model_type="bert",
            num_heads=shape.num_heads,
            hidden_size=shape.hidden_size,
            opt_level=0,  # Python fusions only: no provider-specific rewrites baked in
            use_gpu=use_gpu,
        )
    finally:
        fusion_log.removeFilter(quiet)
    return model, shape


def cpu_inserted_casts(model_path: Path) -> int:
    """How many Casts ONNX Runtime adds on the CPU to run fp16 nodes in float32."""
    import onnx
    import onnxruntime as ort

    before = sum(n.op_type == "Cast" for n in onnx.load(str(model_path)).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        # Basic level: the cast insertion happens at any level; higher levels
        # only add hardware-specific rewrites (and a warning about saving them).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "cpu.onnx")
        ort.InferenceSession(str(model_path), opts, providers=[CPU])
        after = sum(
            n.op_type == "Cast" for n in onnx.load(opts.optimized_model_filepath).graph.node
        )
    return after - before


def _providers(use_gpu: bool | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if use_gpu is None:
        use_gpu = CUDA in available
    if use_gpu and CUDA not in available:
        log.warning("use_gpu requested but %s is not available; checking on the CPU", CUDA)
    return [CUDA, CPU] if use_gpu and CUDA in available else [CPU]


def to_fp16(
    onnx_dir: Path,
    out_dir: Path,
    *,
    use_gpu: bool | None = None,
    check_texts: Sequence[str] | None = None,
    max_abs_diff: float = FP16_MAX_ABS_DIFF,
    min_agreement: float = FP16_MIN_AGREEMENT,
    progress: ProgressFn = no_progress,
) -> OptimizeResult:
    """Fuse an fp32 ``onnx`` folder's graph and convert it to ``onnx-fp16``."""
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    meta = require_format(onnx_dir, ["onnx"], "fp16")
    texts = resolve_check_texts(check_texts)
    parent_path = onnx_dir / ONNX_FILE
    providers = _providers(use_gpu)
    gpu = providers[0] == CUDA

    progress(0.0, "fusing graph")
    config = json.loads((onnx_dir / "config.json").read_text())
    model, shape = fuse_bert(parent_path, config, use_gpu=gpu)
    stats = model.get_fused_operator_statistics()
    fused = {op: int(stats.get(op, 0)) for op in FUSED_OP_TYPES}
    fused.update({op: int(n) for op, n in stats.items() if n})
    log.info("fused operators: %s (attention shape %s)", fused, shape)
    if not fused["Attention"]:
        log.warning("no Attention was fused; the fp16 model keeps unfused attention")

    progress(0.4, "converting to float16")
    model.convert_float_to_float16(keep_io_types=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / ONNX_FILE
    model.save_model_to_file(str(out_path), use_external_data_format=False)
    check_contract(out_path, meta.num_labels)

    progress(0.6, "checking against the fp32 parent")
    tokenizer = load_tokenizer(onnx_dir)
    batches = check_batches(len(texts))
    parent = ort_session(parent_path)
    try:
        child = ort_session(out_path, providers, basic_optimization=True)
    except Exception as exc:  # ORT's own exception types; the job needs one message
        raise StepError(f"ONNX Runtime cannot load the fp16 model: {exc}") from exc
    check_provider = child.get_providers()[0]
    ref = onnx_logits(parent, tokenizer, texts, meta.max_length, batches)
    got = onnx_logits(child, tokenizer, texts, meta.max_length, batches)
    check = compare_logits(ref, got, len(texts))
    log.info("fp16 check on %d texts (%s): %s", len(texts), check_provider, check)
    if check["max_abs_logit_diff"] > max_abs_diff or check["label_agreement"] < min_agreement:
        raise StepError(
            f"fp16 check failed: max abs logit difference {check['max_abs_logit_diff']:.3g} "
            f"(limit {max_abs_diff:g}), label agreement {check['label_agreement']:.1%} "
            f"(minimum {min_agreement:.0%})"
        )
    if check_provider != CPU:
        # The contract is that every variant at least runs on a CPU-only worker.
        try:
            cpu = ort_session(out_path, basic_optimization=True)
            cpu_got = onnx_logits(cpu, tokenizer, texts, meta.max_length, batches)
        except Exception as exc:
            raise StepError(f"the fp16 model does not run on the CPU: {exc}") from exc
        check["cpu_max_abs_logit_diff"] = compare_logits(ref, cpu_got, len(texts))[
            "max_abs_logit_diff"
        ]

    progress(0.8, "timing")
    one = encode(tokenizer, texts[:1], meta.max_length)
    timed_parent = parent if check_provider == CPU else ort_session(parent_path, providers)
    parent_ms = median_latency_ms(lambda: timed_parent.run([LOGITS], one))
    child_ms = median_latency_ms(lambda: child.run([LOGITS], one))

    extra = dict(meta.extra)
    extra.update(fused_operators=fused, fp16_keep_io_types=True)
    finish_onnx_folder(
        onnx_dir,
        out_dir,
        meta.with_format("onnx-fp16", extra),
    )
    parent_size, size = file_size(parent_path), file_size(out_path)
    metrics: dict[str, Any] = {
        "fused_operators": fused,
        "attention_num_heads": shape.num_heads,
        "attention_hidden_size": shape.hidden_size,
        "attention_shape_source": shape.source,
        "check_provider": check_provider,
        "check_texts": len(texts),
        **check,
        "max_abs_diff_limit": max_abs_diff,
        "min_label_agreement": min_agreement,
        "runs_on_cpu": True,
        "cpu_inserted_casts": cpu_inserted_casts(out_path),
        "size_bytes_before": parent_size,
        "size_bytes_after": size,
        "size_ratio": round(size / parent_size, 4),
        # Both on check_provider; on a CPU expect fp16 to be no faster (module doc).
        "latency_ms_batch1_parent": parent_ms,
        "latency_ms_batch1": child_ms,
    }
    progress(1.0, None)
    log.info("fp16 %s -> %s: %s", onnx_dir, out_dir, metrics)
    return OptimizeResult(model_dir=out_dir, metrics=metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.optimize --model DIR --out DIR``: prints metrics as JSON."""
    p = argparse.ArgumentParser(description="Fuse an fp32 ONNX model and convert it to fp16.")
    p.add_argument("--model", type=Path, required=True, help="onnx (fp32) model folder")
    p.add_argument("--out", type=Path, required=True, help="output onnx-fp16 model folder")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None)
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false")
    p.add_argument("--check-data", type=Path, default=None, help="TSV whose sentences to check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: to_fp16(
            args.model,
            args.out,
            use_gpu=args.use_gpu,
            check_texts=load_check_texts(args.check_data),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
