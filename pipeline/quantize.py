"""Step ``quantize``: dynamic int8 quantization of an fp32 ONNX model (``onnx-int8``).

Weights become 8-bit ahead of time; activations are quantized on the fly
(``quantize_dynamic``), so no calibration data is needed. Inputs and the
float32 ``logits`` output keep the ONNX contract.

Choices, measured on this project's scratch BERTs (CPU, ONNX Runtime 1.32):

* **Gather is quantized too.** ``MatMul`` alone leaves the embedding tables in
  float32, and in a small Chinese BERT they are a third or more of the weights
  (vocabulary x hidden): MatMul-only gave 0.57 of the parent's size on the tiny
  scratch model, MatMul + Gather 0.30 (0.25 on ``base``). Label agreement with
  the parent on 400 real test sentences: 1.0 (MatMul only) vs 0.9975 (MatMul +
  Gather) on one trained tiny model, 0.995 on the shared test fixture's model
  (per-channel: 1.0); accuracy on the labels unchanged.
* **The unfused export is quantized by default** (``fuse=False``). Quantizing
  the ORT-fused graph (``QAttention``, ``QEmbedLayerNormalization``) agreed as
  well (0.9926 vs 0.995 on the fixture model), but was slower on this CPU
  (single thread, seq 64: ``base`` batch 1 49 vs 55 ms, batch 8 361 vs 451 ms;
  ``small`` batch 1 2.8 vs 3.3 ms, batch 8 24 vs 32 ms) and needs the ``DefaultTensorType``
  workaround because shape inference cannot type the fused contrib ops'
  outputs. ``fuse=True`` keeps that path available.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from pipeline.optimize import fuse_bert
from pipeline.preprocess import encode, load_tokenizer

log = logging.getLogger(__name__)

# Gather covers the embedding tables (only Gathers over initializers are
# quantized); Attention/EmbedLayerNormalization only occur in a fused graph.
OP_TYPES = ("MatMul", "Gather", "Attention", "EmbedLayerNormalization")
# Dynamic int8 moves logits by ~1e-2..1e-1; labels of a trained model agree on
# ~99%+ of sentences. Below 80% the quantized model is broken, not rounded.
INT8_MIN_AGREEMENT = 0.8
# What "compressed" means for a BERT-like model: int8 weights, embeddings included.
TARGET_SIZE_RATIO = 1 / 3
_QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QEmbedLayerNormalization")


@dataclass
class QuantizeResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class _DropPreprocessHint(logging.Filter):
    """quantize_dynamic logs a root-level hint to run pre-processing; noise in job logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def weight_params(model_path: Path) -> dict[str, int]:
    """Initializer element counts by dtype (``int8``, ``uint8``, ``float32``...)."""
    import onnx

    counts: Counter[str] = Counter()
    for init in onnx.load(str(model_path)).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        counts[str(np.dtype(dtype))] += int(np.prod(init.dims)) if init.dims else 1
    return dict(counts)


def _fused_copy(onnx_dir: Path, tmp: Path) -> Path:
    """The parent graph after ORT's BERT fusion (the ``fuse=True`` source)."""
    config = json.loads((onnx_dir / "config.json").read_text())
    model, _ = fuse_bert(onnx_dir / ONNX_FILE, config)
    path = tmp / "fused.onnx"
    model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def quantize_int8(
    onnx_dir: Path,
    out_dir: Path,
    *,
    per_channel: bool = False,
    check_texts: Sequence[str] | None = None,
    fuse: bool = False,
    min_agreement: float = INT8_MIN_AGREEMENT,
    progress: ProgressFn = no_progress,
) -> QuantizeResult:
    """Dynamic int8 of an fp32 ``onnx`` folder's weights (embeddings included)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    meta = require_format(onnx_dir, ["onnx"], "quantize")
    texts = resolve_check_texts(check_texts)
    parent_path = onnx_dir / ONNX_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / ONNX_FILE

    progress(0.0, "quantizing")
    # Beside out_dir (a job's staging folder): ORT writes a shape-inferred copy
    # next to its input, so the input is linked in here, and a killed run
    # leaves that copy neither in the source model's folder nor in /tmp.
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp_name:
        source = _fused_copy(onnx_dir, Path(tmp_name)) if fuse else Path(tmp_name) / ONNX_FILE
        if not fuse:
            source.symlink_to(parent_path.resolve())
        extra_options: dict[str, Any] = {}
        if fuse:
            # Shape inference leaves the fused contrib ops' outputs untyped; they are float32.
            extra_options["DefaultTensorType"] = onnx.TensorProto.FLOAT
        try:
            with _quiet_quantizer():
                quantize_dynamic(
                    str(source),
                    str(out_path),
                    op_types_to_quantize=list(OP_TYPES),
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                    extra_options=extra_options,
                )
        except Exception as exc:  # ORT raises assorted types; the job needs one message
            raise StepError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    check_contract(out_path, meta.num_labels)
    parent_size, size = file_size(parent_path), file_size(out_path)
    ratio = size / parent_size
    if ratio > TARGET_SIZE_RATIO:
        log.warning("int8 model is %.2f of its parent's size (target <= 1/3)", ratio)

    progress(0.5, "checking against the fp32 parent")
    tokenizer = load_tokenizer(onnx_dir)
    batches = check_batches(len(texts))
    parent = ort_session(parent_path)
    child = ort_session(out_path)
    ref = onnx_logits(parent, tokenizer, texts, meta.max_length, batches)
    got = onnx_logits(child, tokenizer, texts, meta.max_length, batches)
    check = compare_logits(ref, got, len(texts))
    log.info("int8 check on %d texts: %s", len(texts), check)
    if check["label_agreement"] < min_agreement:
        raise StepError(
            f"int8 check failed: labels agree with the fp32 parent on "
            f"{check['label_agreement']:.1%} of {len(texts)} check texts "
            f"(minimum {min_agreement:.0%}); "
            f"max abs logit difference {check['max_abs_logit_diff']:.3g}"
        )

    progress(0.8, "timing")
    one = encode(tokenizer, texts[:1], meta.max_length)
    parent_ms = median_latency_ms(lambda: parent.run([LOGITS], one))
    child_ms = median_latency_ms(lambda: child.run([LOGITS], one))

    source_graph = "fused" if fuse else "unfused"
    extra = dict(meta.extra)
    extra.update(quantization="dynamic-int8", per_channel=per_channel, source_graph=source_graph)
    finish_onnx_folder(
        onnx_dir,
        out_dir,
        meta.with_format("onnx-int8", extra),
    )
    ops = Counter(n.op_type for n in onnx.load(str(out_path)).graph.node)
    metrics: dict[str, Any] = {
        "source_graph": source_graph,
        "per_channel": per_channel,
        "weight_type": "QInt8",
        "op_types": list(OP_TYPES),
        "quantized_nodes": {op: ops[op] for op in _QUANT_OPS if ops[op]},
        "weight_params": weight_params(out_path),
        "size_bytes_before": parent_size,
        "size_bytes_after": size,
        "size_ratio": round(ratio, 4),
        "check_texts": len(texts),
        **check,
        "min_label_agreement": min_agreement,
        "latency_ms_batch1_parent": parent_ms,
        "latency_ms_batch1": child_ms,
    }
    progress(1.0, None)
    log.info("int8 %s -> %s: %s", onnx_dir, out_dir, metrics)
    return QuantizeResult(model_dir=out_dir, metrics=metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.quantize --model DIR --out DIR``: prints metrics as JSON."""
    p = argparse.ArgumentParser(description="Dynamic int8 quantization of an fp32 ONNX model.")
    p.add_argument("--model", type=Path, required=True, help="onnx (fp32) model folder")
    p.add_argument("--out", type=Path, required=True, help="output onnx-int8 model folder")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--fuse", action="store_true", help="quantize the ORT-fused graph instead")
    p.add_argument("--check-data", type=Path, default=None, help="TSV whose sentences to check")
    p.add_argument("--min-agreement", type=float, default=INT8_MIN_AGREEMENT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: quantize_int8(
            args.model,
            args.out,
            per_channel=args.per_channel,
            check_texts=load_check_texts(args.check_data),
            fuse=args.fuse,
            min_agreement=args.min_agreement,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
