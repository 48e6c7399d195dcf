"""Step ``prune``: structured pruning of attention heads and FFN neurons (TextPruner's idea).

Importance scores are computed on a labelled dataset the way TextPruner and
Michel et al. (2019) do: every head and every FFN neuron gets a mask variable
(all ones, so the forward pass is unchanged) and its importance is
``|dL/dmask|`` summed over batches. The least important heads and neurons of
each layer are then cut out of the weight matrices (uniformly: every layer
keeps ``target_heads`` heads and ``target_ffn`` neurons), giving a genuinely
smaller model, optionally fine-tuned afterwards.

The pruned model is a :class:`pipeline.pruned_bert.PrunedBertForSequenceClassification`
(``model_type`` ``textcls_pruned_bert``, BERT with an explicit per-head width),
which :func:`pipeline.modeling.load_model` loads back.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertForSequenceClassification

from pipeline.common import (
    ProgressFn,
    StepError,
    add_training_args,
    no_progress,
    run_cli_step,
    training_kwargs,
)
from pipeline.contract import META_FILE, ModelMeta
from pipeline.data import Examples, TSVError, read_tsv
from pipeline.metrics import classification_metrics
from pipeline.modeling import architecture, load_model, save_model_folder
from pipeline.preprocess import encode, load_tokenizer
from pipeline.pruned_bert import (
    PRUNED_MODEL_TYPE,
    PrunedBertConfig,
    PrunedBertForSequenceClassification,
)
from pipeline.train import (
    EVAL_FRACTION,
    PRETRAINED_LR,
    fine_tune,
    iter_batches,
    predict_dataset,
    resolve_device,
    set_seed,
    stratified_split,
    to_torch,
)

log = logging.getLogger(__name__)

# The seed prunes bert-base (12 heads, FFN 3072) to 8 heads and FFN 2048; a model
# already at or below a target is scaled by the same ratio instead.
SEED_HEAD_RATIO = 8 / 12
SEED_FFN_RATIO = 2048 / 3072
# Head/neuron rankings settle after a few thousand rows; a bigger dataset only
# costs time (every row is a forward and backward pass).
IMPORTANCE_MAX_ROWS = 4096
LATENCY_SENTENCES = 32
LATENCY_WARMUP = 3
# Fine-tuning after pruning starts from trained weights: the usual pretrained
# step, a little larger for models whose lineage is a from-scratch preset
# (train uses SCRATCH_LR, 5e-4, from scratch; here 2e-4 recovered as well as 1e-3).
SCRATCH_LINEAGE_LR = 2e-4


# --------------------------------------------------------------------------
# Targets, importance scores, slicing
# --------------------------------------------------------------------------


@dataclass
class PruneResult:
    """Where the pruned model was saved and what was measured; ``model`` is the in-memory copy."""

    model_dir: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def resolve_targets(heads: int, ffn: int, target_heads: int, target_ffn: int) -> tuple[int, int]:
    """The per-layer head and FFN counts to keep.

    A model with no more heads (or FFN neurons) than asked for would not shrink,
    so its target becomes its own size times the seed's ratio (8/12, 2048/3072),
    rounded to the nearest integer and at least 1.
    """
    if target_heads < 1 or target_ffn < 1:
        raise StepError(
            f"target_heads and target_ffn must be >= 1 (got {target_heads}, {target_ffn})"
        )
    new_heads = target_heads if heads > target_heads else max(1, round(heads * SEED_HEAD_RATIO))
    new_ffn = target_ffn if ffn > target_ffn else max(1, round(ffn * SEED_FFN_RATIO))
    return new_heads, new_ffn


def _bert_layers(model: Any) -> list[Any]:
    bert = getattr(model, "bert", None)
    if bert is None or not isinstance(model, BertForSequenceClassification):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise StepError(
            "prune supports BERT sequence classifiers (model_type 'bert' or "
            f"'{PRUNED_MODEL_TYPE}'), got {kind!r}"
        )
    return list(bert.encoder.layer)


def _batches(
    tokenizer: Any, data: Examples, batch_size: int, max_length: int
) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    return list(iter_batches(tokenizer, data, batch_size, max_length, shuffle=False))


def importance_scores(
    model: Any,
    tokenizer: Any,
    data: Examples,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head importance ``[layers, heads]`` and FFN neuron importance ``[layers, ffn]``.

    Each is ``sum over batches of |dL/dmask|`` for a mask of ones multiplied into
    the head's context vectors / the neuron's activation (L = cross-entropy on
    the dataset's labels). Dropout is off so the scores are deterministic.
    """
    layers = _bert_layers(model)
    n_heads = int(layers[0].attention.self.num_attention_heads)
    head_size = int(layers[0].attention.self.attention_head_size)
    n_ffn = int(layers[0].intermediate.dense.out_features)
    head_mask = torch.ones(len(layers), n_heads, device=device, requires_grad=True)
    ffn_mask = torch.ones(len(layers), n_ffn, device=device, requires_grad=True)
    head_imp = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    ffn_imp = torch.zeros(len(layers), n_ffn, dtype=torch.float64)

    def attn_hook(i: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
            ctx = out[0]
            shape = ctx.shape
            ctx = (ctx.view(*shape[:-1], n_heads, head_size) * head_mask[i].view(n_heads, 1)).view(
                shape
            )
            return (ctx, *out[1:])

        return hook

    def ffn_hook(i: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return out * ffn_mask[i]

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.attention.self.register_forward_hook(attn_hook(i)))
        handles.append(layer.intermediate.register_forward_hook(ffn_hook(i)))
    # Only the masks need gradients; freezing the weights saves their backward work.
    requires = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in requires:
        p.requires_grad_(False)
    was_training = model.training
    model.to(device).eval()
    labels_all = torch.tensor(data.labels, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    try:
        batches = _batches(tokenizer, data, batch_size, max_length)
        for b, (idx, enc) in enumerate(batches):
            logits = model(**to_torch(enc, device)).logits
            loss = loss_fn(logits.float(), labels_all[idx].to(device)) / len(data)
            loss.backward()
            assert head_mask.grad is not None and ffn_mask.grad is not None
            head_imp += head_mask.grad.detach().abs().double().cpu()
            ffn_imp += ffn_mask.grad.detach().abs().double().cpu()
            head_mask.grad = None
            ffn_mask.grad = None
            progress((b + 1) / len(batches), "importance")
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires:
            p.requires_grad_(flag)
        model.train(was_training)
    return head_imp, ffn_imp


def _subsample(data: Examples, limit: int, seed: int) -> Examples:
    """At most ``limit`` rows of ``data``, drawn with a seeded RNG, in file order."""
    if len(data) <= limit:
        return data
    rows = np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False))
    return Examples(
        texts=[data.texts[i] for i in rows],
        labels=[data.labels[i] for i in rows],
        indices=[data.indices[i] for i in rows] if data.indices else [],
    )


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return torch.sort(order).values


def prune_model(
    model: Any, keep_heads: Sequence[torch.Tensor], keep_ffn: Sequence[torch.Tensor]
) -> Any:
    """A new, smaller :class:`PrunedBertForSequenceClassification` keeping the given units.

    ``keep_heads[i]`` / ``keep_ffn[i]`` are the head / neuron indices kept in
    layer ``i`` (every layer keeps the same number). The result computes
    exactly what ``model`` computes with the other heads and neurons masked out.
    """
    layers = _bert_layers(model)
    if len(keep_heads) != len(layers) or len(keep_ffn) != len(layers):
        raise ValueError("need one head list and one FFN list per layer")
    n_heads = {len(k) for k in keep_heads}
    n_ffn = {len(k) for k in keep_ffn}
    if len(n_heads) != 1 or len(n_ffn) != 1:
        raise ValueError(
            "pruning is uniform: every layer keeps the same number of heads and neurons"
        )
    head_size = int(layers[0].attention.self.attention_head_size)

    cfg = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    cfg.update(
        num_attention_heads=n_heads.pop(),
        attention_head_size=head_size,
        intermediate_size=n_ffn.pop(),
    )
    config = PrunedBertConfig(**cfg)
    config._attn_implementation = model.config._attn_implementation or "eager"

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, (heads, ffn) in enumerate(zip(keep_heads, keep_ffn, strict=True)):
        rows = torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads.tolist()])
        ffn_idx = torch.as_tensor(ffn, dtype=torch.long)
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[p + f"attention.self.{name}.weight"] = state[p + f"attention.self.{name}.weight"][
                rows
            ]
            state[p + f"attention.self.{name}.bias"] = state[p + f"attention.self.{name}.bias"][
                rows
            ]
        out_w = p + "attention.output.dense.weight"
        state[out_w] = state[out_w][:, rows]
        state[p + "intermediate.dense.weight"] = state[p + "intermediate.dense.weight"][ffn_idx]
        state[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][ffn_idx]
        state[p + "output.dense.weight"] = state[p + "output.dense.weight"][:, ffn_idx]
    pruned = PrunedBertForSequenceClassification(config)
    # Buffers such as position_ids are rebuilt by the constructor; weights must all match.
    result = pruned.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    unexpected = [k for k in result.unexpected_keys if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"pruned state mismatch: missing {missing}, unexpected {unexpected}")
    return pruned.eval()


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def weights_size_bytes(folder: Path) -> int:
    """Bytes of the weight files in a model folder (safetensors / bin)."""
    return sum(
        p.stat().st_size
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix in {".safetensors", ".bin"}
    )


def _accuracy(
    model: Any,
    tokenizer: Any,
    data: Examples,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    progress: ProgressFn,
) -> float:
    logits = predict_dataset(
        model,
        tokenizer,
        data,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )
    num_labels = int(model.config.num_labels)
    return float(classification_metrics(data.labels, logits.argmax(axis=1), num_labels)["accuracy"])


def latency_side_by_side(
    models: dict[str, Any],
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    progress: ProgressFn = no_progress,
) -> dict[str, dict[str, float]]:
    """Batch-1 CPU forward latency (ms) of several models on the same sentences.

    The models alternate sentence by sentence (and swap order every sentence)
    so load from other processes on a shared machine hits them alike.
    """
    encoded = [
        {k: torch.from_numpy(v) for k, v in encode(tokenizer, [t], max_length).items()}
        for t in texts
    ]
    names = list(models)
    for m in models.values():
        m.to("cpu").eval()
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for inputs in encoded[:LATENCY_WARMUP]:
            for n in names:
                models[n](**inputs)
        for i, inputs in enumerate(encoded):
            for n in names if i % 2 == 0 else reversed(names):
                start = time.perf_counter()
                models[n](**inputs)
                times[n].append((time.perf_counter() - start) * 1000.0)
            progress((i + 1) / len(encoded), "latency")
    return {
        n: {
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(np.mean(t)),
        }
        for n, t in times.items()
    }


def _stage(progress: ProgressFn, lo: float, hi: float) -> ProgressFn:
    """A progress callback mapping 0..1 onto lo..hi of the caller's bar."""

    def inner(fraction: float, stage: str | None = None) -> None:
        progress(lo + (hi - lo) * min(1.0, max(0.0, fraction)), stage)

    return inner


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------


def load_pytorch_folder(model_dir: Path, step: str) -> ModelMeta:
    """The folder's :class:`ModelMeta`, or :class:`StepError` unless it is a pytorch model."""
    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file():
        raise StepError(f"{model_dir} is not a textcls model folder (no {META_FILE})")
    meta = ModelMeta.load(model_dir)
    if meta.format != "pytorch":
        raise StepError(f"{step} needs a pytorch model, got {meta.format}")
    return meta


def default_learning_rate(meta: ModelMeta) -> float:
    """Fine-tuning step for a model: pretrained-style unless it descends from a scratch preset."""

    base = str(meta.extra.get("base_model", ""))
    return SCRATCH_LINEAGE_LR if base.startswith("scratch:") else PRETRAINED_LR


def read_dataset(path: Path) -> Examples:
    """:func:`pipeline.data.read_tsv`, with format problems as :class:`StepError`."""
    try:
        return read_tsv(Path(path))
    except TSVError as exc:
        raise StepError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise StepError(f"cannot read dataset {path}: {exc}") from exc


def prune(
    model_dir: Path,
    dataset_tsv: Path,
    out_dir: Path,
    *,
    target_heads: int = 8,
    target_ffn: int = 2048,
    max_length: int = 128,
    batch_size: int = 32,
    epochs: int = 0,
    learning_rate: float | None = None,
    seed: int = 42,
    device: str | None = None,
    progress: ProgressFn = no_progress,
) -> PruneResult:
    """Prune a pytorch model to ``target_heads`` heads and ``target_ffn`` FFN neurons per layer.

    Importance scores come from ``dataset_tsv`` (a seeded sample of at most
    ``IMPORTANCE_MAX_ROWS`` rows of it). With ``epochs > 0`` the pruned
    model is fine-tuned on the dataset minus a stratified 10% held out; all
    accuracies are then measured on that held-out part (otherwise on the whole
    dataset), so before/after numbers are always on the same rows.
    """

    start = time.perf_counter()
    meta = load_pytorch_folder(Path(model_dir), "prune")
    if batch_size < 1 or max_length < 2 or epochs < 0:
        raise StepError(
            f"batch_size must be >= 1, max_length >= 2, epochs >= 0 "
            f"(got {batch_size}, {max_length}, {epochs})"
        )
    data = read_dataset(dataset_tsv)
    dev = resolve_device(device)
    set_seed(seed)
    progress(0.0, "load")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    layers = _bert_layers(model)
    num_labels = int(model.config.num_labels)
    too_big = sorted({y for y in data.labels if y >= num_labels})
    if too_big:
        raise StepError(f"dataset has labels {too_big} but the model has {num_labels} labels")

    heads = int(layers[0].attention.self.num_attention_heads)
    ffn = int(layers[0].intermediate.dense.out_features)
    new_heads, new_ffn = resolve_targets(heads, ffn, target_heads, target_ffn)
    if (new_heads, new_ffn) != (target_heads, target_ffn):
        log.info(
            "model has %d heads / FFN %d: targets %d/%d scaled to %d/%d",
            heads,
            ffn,
            target_heads,
            target_ffn,
            new_heads,
            new_ffn,
        )

    if epochs > 0:
        train_part, scored = stratified_split(data, EVAL_FRACTION, seed)
        if len(scored) == 0:
            raise StepError("too few rows to hold out an evaluation set for fine-tuning")
        accuracy_on = f"held-out {EVAL_FRACTION:.0%} of the dataset ({len(scored)} rows)"
    else:
        train_part, scored = data, data
        accuracy_on = f"the dataset ({len(data)} rows)"
    # Bar: evaluate 10%, importance 30%, evaluate 10%, [fine-tune 35%], latency, save.
    ft_share = 0.35 if epochs > 0 else 0.0
    eval_kw: dict[str, Any] = dict(batch_size=batch_size, max_length=max_length, device=dev)
    arch_before = architecture(model)
    acc_before = _accuracy(model, tokenizer, scored, progress=_stage(progress, 0.0, 0.1), **eval_kw)
    scoring = _subsample(train_part, IMPORTANCE_MAX_ROWS, seed)
    head_imp, ffn_imp = importance_scores(
        model,
        tokenizer,
        scoring,
        batch_size=batch_size,
        max_length=max_length,
        device=dev,
        progress=_stage(progress, 0.1, 0.4),
    )
    keep_heads = [_top(head_imp[i], new_heads) for i in range(len(layers))]
    keep_ffn = [_top(ffn_imp[i], new_ffn) for i in range(len(layers))]
    pruned = prune_model(model.to("cpu"), keep_heads, keep_ffn).to(dev)
    progress(0.42, "prune")
    acc_pruned = _accuracy(
        pruned, tokenizer, scored, progress=_stage(progress, 0.42, 0.5), **eval_kw
    )
    log.info(
        "pruned to %d heads / FFN %d: accuracy %.4f -> %.4f on %s",
        new_heads,
        new_ffn,
        acc_before,
        acc_pruned,
        accuracy_on,
    )

    metrics: dict[str, Any] = {}
    acc_after = acc_pruned
    if epochs > 0:
        lr = learning_rate if learning_rate is not None else default_learning_rate(meta)
        ft = fine_tune(
            pruned,
            tokenizer,
            train_part,
            scored,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=lr,
            max_length=max_length,
            seed=seed,
            device=dev,
            progress=_stage(progress, 0.5, 0.5 + ft_share),
        )
        acc_after = _accuracy(pruned, tokenizer, scored, progress=no_progress, **eval_kw)
        metrics["fine_tune"] = ft
        metrics["accuracy_after_fine_tune"] = acc_after

    arch_after = architecture(pruned)
    texts = scored.texts[:LATENCY_SENTENCES]
    lat = latency_side_by_side(
        {"before": model, "after": pruned},
        tokenizer,
        texts,
        max_length,
        progress=_stage(progress, 0.5 + ft_share, 0.95),
    )
    out = Path(out_dir)
    new_meta = ModelMeta(
        format="pytorch",
        max_length=meta.max_length,
        num_labels=num_labels,
        label_names=meta.label_names,
        extra={
            "pruned_from": str(Path(model_dir).resolve()),
            "architecture": arch_after,
            "prune": {"target_heads": new_heads, "target_ffn": new_ffn, "epochs": epochs},
            # Lineage, so later steps still know a from-scratch model's needs.
            **({"base_model": meta.extra["base_model"]} if "base_model" in meta.extra else {}),
        },
    )
    save_model_folder(pruned, tokenizer, out, new_meta)
    progress(1.0, "save")
    metrics.update(
        heads_before=heads,
        heads_after=new_heads,
        head_size=int(pruned.config.attention_head_size),
        ffn_before=ffn,
        ffn_after=new_ffn,
        requested={"target_heads": target_heads, "target_ffn": target_ffn},
        layers=len(layers),
        parameters_before=arch_before["parameters"],
        parameters_after=arch_after["parameters"],
        size_bytes_before=weights_size_bytes(Path(model_dir)),
        size_bytes_after=weights_size_bytes(out),
        latency_before_ms=lat["before"]["p50_ms"],
        latency_after_ms=lat["after"]["p50_ms"],
        latency=lat,
        latency_sentences=len(texts),
        accuracy_before=acc_before,
        accuracy_after_prune=acc_pruned,
        accuracy_after=acc_after,
        accuracy_on=accuracy_on,
        importance_rows=len(scoring),
        kept_heads=[k.tolist() for k in keep_heads],
        num_labels=num_labels,
        architecture_before=arch_before,
        architecture=arch_after,
        device=str(dev),
        seconds=time.perf_counter() - start,
    )
    log.info(
        "saved %s: %d -> %d parameters, %d -> %d bytes, p50 %.2f -> %.2f ms (%.1fs)",
        out,
        metrics["parameters_before"],
        metrics["parameters_after"],
        metrics["size_bytes_before"],
        metrics["size_bytes_after"],
        metrics["latency_before_ms"],
        metrics["latency_after_ms"],
        metrics["seconds"],
    )
    return PruneResult(model_dir=out, metrics=metrics, model=pruned, tokenizer=tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.prune --model DIR --data X.tsv --out DIR``: prints metrics as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, required=True, help="pytorch model folder to prune")
    p.add_argument("--data", type=Path, required=True, help="TSV for importance scores")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--target-heads", type=int, default=8)
    p.add_argument("--target-ffn", type=int, default=2048)
    add_training_args(p, epochs=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: prune(
            args.model,
            args.data,
            args.out,
            target_heads=args.target_heads,
            target_ffn=args.target_ffn,
            **training_kwargs(args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "PruneResult",
    "importance_scores",
    "latency_side_by_side",
    "prune",
    "prune_model",
    "resolve_targets",
    "weights_size_bytes",
]
