"""Step ``export``: a PyTorch model folder to an ONNX model folder, checked against PyTorch.

The ONNX contract every ``onnx*`` variant keeps (names in :mod:`pipeline.contract`;
:mod:`pipeline.runtime` relies on it):
inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic
``batch`` and ``sequence`` axes), output ``logits`` (float32, ``[batch, num_labels]``),
one self-contained ``model.onnx`` (weights inside, no external data).

Exporter: the TorchScript (``dynamo=False``) exporter. Both exporters handle
dynamic batch and sequence correctly for BERT here, but only the TorchScript
graph is recognised by ONNX Runtime's BERT fusion (4/4 ``Attention`` and the
``EmbedLayerNormalization`` on an eager scratch BERT; the dynamo graph got 0 of
either), and the ``fp16`` step depends on that fusion.

The helpers below (format checks, the contract check, running and comparing
logits) are shared by :mod:`pipeline.optimize` and :mod:`pipeline.quantize`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import ProgressFn, StepError, no_progress, run_cli_step
from pipeline.contract import LOGITS, META_FILE, MODEL_INPUTS, ONNX_FILE, ModelMeta
from pipeline.data import read_tsv
from pipeline.modeling import copy_tokenizer_and_meta, load_model
from pipeline.preprocess import encode, load_tokenizer

log = logging.getLogger(__name__)

EXPORTER = "torchscript"
# Protobuf's hard limit; larger models would need external data, out of scope here.
MAX_ONNX_BYTES = 2 * 1024**3
CHECK_BATCH_SIZE = 8
# How many texts are also checked one at a time (batch 1, unpadded).
CHECK_SINGLES = 3
# A check is a sanity test, not an evaluation: cap it (base BERT on a CPU: ~15 s).
MAX_CHECK_TEXTS = 512
LATENCY_REPEATS = 20
LATENCY_WARMUP = 3

# Real shopping-review style sentences of different lengths, used when the
# caller gives no check texts.
DEFAULT_CHECK_TEXTS: tuple[str, ...] = (
    "这个东西很好用，质量不错，推荐购买。",
    "差评，完全不能用。",
    "物流很快，包装也很严实，宝贝和描述的一样，下次还会再来光顾的。",
    "一般般吧。",
    "价格有点贵，但是服务态度还可以，客服回复也及时。",
    "屏幕有坏点，联系客服换货，等了一个星期都没有人处理，非常失望，再也不买了！",
    "好",
    "还行，性价比挺高的，就是声音有点小。",
)
# The trace example: batch 2 with padding, so neither axis is traced at size 1.
_EXAMPLE_TEXTS = ("这个东西很好用，推荐", "差评")


@dataclass
class ExportResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Shared helpers for the ONNX steps
# --------------------------------------------------------------------------


def require_format(model_dir: Path, allowed: Sequence[str], step: str) -> ModelMeta:
    """The folder's :class:`ModelMeta`, or :class:`StepError` if its format is not ``allowed``."""
    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file():
        raise StepError(f"{step} needs a textcls model folder; {model_dir} has no {META_FILE}")
    meta = ModelMeta.load(model_dir)
    if meta.format not in allowed:
        want = " or ".join(allowed)
        article = "an" if want[0] in "aeiou" else "a"
        raise StepError(f"{step} needs {article} {want} model, got {meta.format}")
    if meta.format.startswith("onnx") and not (model_dir / ONNX_FILE).is_file():
        raise StepError(f"{step}: {model_dir} has no {ONNX_FILE}")
    return meta


def check_contract(model_path: Path, num_labels: int | None = None) -> None:
    """Raise :class:`StepError` unless the ONNX file follows the textcls ONNX contract."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    problems: list[str] = []
    inputs = {i.name: i for i in graph.input}
    if sorted(inputs) != sorted(MODEL_INPUTS):
        problems.append(f"inputs are {sorted(inputs)}, expected {list(MODEL_INPUTS)}")
    for name in MODEL_INPUTS:
        if name not in inputs:
            continue
        tt = inputs[name].type.tensor_type
        if tt.elem_type != int64:
            problems.append(f"input {name} is not int64")
        dims = [d.dim_param for d in tt.shape.dim]
        if len(dims) != 2 or not all(dims):
            problems.append(f"input {name} does not have dynamic batch and sequence axes")
    outputs = [o for o in graph.output if o.name == LOGITS]
    if not outputs:
        problems.append(f"no output named {LOGITS!r}")
    else:
        tt = outputs[0].type.tensor_type
        if tt.elem_type != float32:
            problems.append(f"output {LOGITS} is not float32")
        dims = list(tt.shape.dim)
        if len(dims) != 2 or not dims[0].dim_param:
            problems.append(f"output {LOGITS} is not [batch, num_labels]")
        elif num_labels is not None and dims[1].dim_value not in (0, num_labels):
            problems.append(f"output {LOGITS} has {dims[1].dim_value} labels, not {num_labels}")
    if problems:
        raise StepError(f"{model_path.name} breaks the ONNX contract: " + "; ".join(problems))


def ort_session(
    model_path: Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    basic_optimization: bool = False,
) -> Any:
    """An ONNX Runtime session on ``providers`` (in order of preference).

    ``basic_optimization`` mirrors how ``pipeline.runtime`` serves already-fused
    fp16 graphs (ORT_ENABLE_BASIC), so a check runs what will be served.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if basic_optimization:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(model_path), opts, providers=list(providers))


def check_batches(n: int, batch_size: int = CHECK_BATCH_SIZE) -> list[list[int]]:
    """Index batches for a check: a few texts alone, then all in padded batches.

    Varies batch size and sequence length beyond the export's trace example,
    which is what breaks a graph with shapes baked in.
    """
    singles = [[i] for i in range(min(CHECK_SINGLES, n))]
    return singles + [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def onnx_logits(
    session: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batches: list[list[int]]
) -> np.ndarray:
    """Logits of ``session`` for every batch of ``batches``, concatenated in order."""
    out = []
    for idx in batches:
        feed = encode(tokenizer, [texts[i] for i in idx], max_length)
        out.append(np.asarray(session.run([LOGITS], feed)[0], dtype=np.float32))
    return np.concatenate(out)


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, n_texts: int | None = None
) -> dict[str, float]:
    """Max abs logit difference (all rows) and the share of texts with the same argmax.

    With ``n_texts``, agreement counts only the last ``n_texts`` rows: the
    :func:`check_batches` layout, where the leading batch-1 rows repeat texts.
    A text whose reference logits are a near tie (top two closer than twice
    the conversion's typical logit change, the median over the texts) counts
    as agreeing whichever way it went: rounding can flip it without the
    conversion being wrong. An undertrained model (a demo on 400 rows) has
    many such texts; ``near_tie_flips`` counts the ones that flipped.
    """
    rows = slice(-n_texts, None) if n_texts else slice(None)
    ref, cand = reference[rows], candidate[rows]
    agree = ref.argmax(axis=-1) == cand.argmax(axis=-1)
    top_two = np.sort(ref, axis=-1)[:, -2:]
    margin = top_two[:, -1] - top_two[:, 0]
    typical = float(np.median(np.abs(ref - cand).max(axis=-1)))
    near_tie = margin <= 2 * typical
    return {
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "label_agreement": float((agree | near_tie).mean()),
        "near_tie_flips": int((near_tie & ~agree).sum()),
    }


def median_latency_ms(
    fn: Callable[[], Any], repeats: int = LATENCY_REPEATS, warmup: int = LATENCY_WARMUP
) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def resolve_check_texts(check_texts: Sequence[str] | None) -> list[str]:
    """The non-empty check texts (built-in ones if none), at most ``MAX_CHECK_TEXTS``."""
    texts = [t for t in (check_texts or DEFAULT_CHECK_TEXTS) if t and t.strip()]
    if not texts:
        raise StepError("no non-empty check texts given")
    if len(texts) > MAX_CHECK_TEXTS:
        log.info("checking the first %d of %d texts", MAX_CHECK_TEXTS, len(texts))
    return texts[:MAX_CHECK_TEXTS]


def finish_onnx_folder(src_dir: Path, out_dir: Path, meta: ModelMeta) -> None:
    """Copy config and tokenizer next to ``model.onnx`` and write ``textcls.json`` last.

    ``textcls.json`` is what makes a folder a model, so a step that fails its
    check before this leaves no loadable half-artifact.
    """
    copy_tokenizer_and_meta(src_dir, out_dir)
    meta.save(out_dir)


def file_size(path: Path) -> int:
    size = Path(path).stat().st_size
    if size >= MAX_ONNX_BYTES:
        raise StepError(f"{path.name} is {size} bytes; models over 2 GB are not supported")
    return size


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def _logits_module(model: Any) -> Any:
    """Wrap a HF classifier so the traced graph has three positional inputs and one output."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).logits

    return LogitsOnly(model).eval()


def export_module(model: Any, tokenizer: Any, out_path: Path, max_length: int, opset: int) -> None:
    """Trace ``model`` (a HF sequence classifier) to ``out_path`` with the ONNX contract."""
    import torch

    example = encode(tokenizer, _EXAMPLE_TEXTS, max_length)
    args = tuple(torch.from_numpy(example[name]) for name in MODEL_INPUTS)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in MODEL_INPUTS}
    dynamic_axes[LOGITS] = {0: "batch"}
    wrapped = _logits_module(model)
    with warnings.catch_warnings():
        # Tracer warnings about Python bools from shapes in HF's mask code; the
        # check below runs other shapes, which is what would catch a baked-in branch.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        # "aten::index ... negative indices": HF's padding mask indexes with
        # torch.arange batch/kv indices, which are never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.no_grad():
            torch.onnx.export(
                wrapped,
                args,
                str(out_path),
                dynamo=False,
                input_names=list(MODEL_INPUTS),
                output_names=[LOGITS],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    *,
    check_texts: Sequence[str] | None = None,
    opset: int = 17,
    atol: float = 1e-3,
    progress: ProgressFn = no_progress,
) -> ExportResult:
    """Export a ``pytorch`` folder to an ``onnx`` folder; fail unless ORT matches PyTorch."""
    import onnx
    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = require_format(model_dir, ["pytorch"], "export")
    texts = resolve_check_texts(check_texts)
    progress(0.0, "loading model")
    # load_tokenizer registers a pruned BERT's architecture with transformers
    # (the only registration here); load_model then finds it known.
    tokenizer = load_tokenizer(model_dir)
    # float(): a half-precision checkpoint must still give float32 logits.
    model = load_model(model_dir).float().eval()

    progress(0.1, "exporting")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    start = time.perf_counter()
    try:
        export_module(model, tokenizer, onnx_path, meta.max_length, opset)
    except Exception as exc:  # the exporter raises many types; the job needs one message
        raise StepError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    export_seconds = time.perf_counter() - start
    size = file_size(onnx_path)
    onnx.checker.check_model(str(onnx_path))
    check_contract(onnx_path, meta.num_labels)

    progress(0.5, "checking against PyTorch")
    batches = check_batches(len(texts))
    session = ort_session(onnx_path)
    got = onnx_logits(session, tokenizer, texts, meta.max_length, batches)
    ref = []
    shapes: list[tuple[int, int]] = []
    with torch.inference_mode():
        for idx in batches:
            feed = encode(tokenizer, [texts[i] for i in idx], meta.max_length)
            shapes.append(feed["input_ids"].shape)
            ref.append(model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy())
    check = compare_logits(np.concatenate(ref), got, len(texts))
    log.info("export check on %d texts: %s", len(texts), check)
    if check["max_abs_logit_diff"] > atol:
        raise StepError(
            f"ONNX check failed: max abs logit difference {check['max_abs_logit_diff']:.3g} "
            f"> atol {atol:g}"
        )
    if check["label_agreement"] < 1.0:
        raise StepError(
            f"ONNX check failed: predicted labels differ from PyTorch on "
            f"{1 - check['label_agreement']:.1%} of {len(texts)} check texts"
        )

    progress(0.8, "timing")
    one = encode(tokenizer, texts[:1], meta.max_length)
    torch_one = {k: torch.from_numpy(v) for k, v in one.items()}
    with torch.inference_mode():
        torch_ms = median_latency_ms(lambda: model(**torch_one))
    onnx_ms = median_latency_ms(lambda: session.run([LOGITS], one))

    extra = dict(meta.extra)
    extra.update(exporter=EXPORTER, opset=opset)
    finish_onnx_folder(
        model_dir,
        out_dir,
        meta.with_format("onnx", extra),
    )
    metrics: dict[str, Any] = {
        "exporter": EXPORTER,
        "opset": opset,
        "onnx_size_bytes": size,
        "atol": atol,
        "check_texts": len(texts),
        "check_batch_sizes": sorted({b for b, _ in shapes}),
        "check_seq_len_range": [min(n for _, n in shapes), max(n for _, n in shapes)],
        **check,
        "latency_ms_batch1_pytorch": torch_ms,
        "latency_ms_batch1_onnx": onnx_ms,
        "export_seconds": round(export_seconds, 3),
    }
    progress(1.0, None)
    log.info("exported %s -> %s: %s", model_dir, out_dir, metrics)
    return ExportResult(model_dir=out_dir, metrics=metrics)


def load_check_texts(path: Path | None, limit: int = 64) -> list[str] | None:
    """Up to ``limit`` sentences of a TSV dataset (for the CLIs' ``--check-data``)."""
    return read_tsv(path).texts[:limit] if path else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.export --model DIR --out DIR``: prints metrics as JSON."""
    p = argparse.ArgumentParser(description="Export a pytorch model folder to ONNX.")
    p.add_argument("--model", type=Path, required=True, help="pytorch model folder")
    p.add_argument("--out", type=Path, required=True, help="output onnx model folder")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--check-data", type=Path, default=None, help="TSV whose sentences to check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: export_onnx(
            args.model,
            args.out,
            check_texts=load_check_texts(args.check_data),
            opset=args.opset,
            atol=args.atol,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
