"""Resumable training state: a training loop saves it, a later attempt resumes from it.

A :class:`Checkpointer` owns one folder (the job runner gives each job its
own, ``checkpoints/<job id>/`` in the artifact store) holding one file,
``checkpoint.pt``: the model, optimizer and scheduler states, where the loop
was (epoch, batches done in it, optimizer step), the loop's own bookkeeping
(history, best epoch so far) and every random generator's state. It is
written to a temporary file in the same folder and renamed over the old one,
so a process killed mid-save leaves the previous checkpoint, never half a
file. :meth:`Checkpointer.due` says when a mid-epoch save is wanted (every
``every_seconds``); loops save at the end of every epoch regardless.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"
VERSION = 1


@dataclass
class Checkpointer:
    """Where (and how often, within an epoch) a training loop saves its state."""

    folder: Path
    every_seconds: float | None = None
    # Called with the saved file after each save (the job runner uploads it to
    # an object store, so an attempt on another host can resume).
    on_save: Callable[[Path], None] | None = None
    _last: float = field(default_factory=time.monotonic, init=False, repr=False)

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it is unreadable)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file from another version: start over
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            log.warning("ignoring checkpoint %s of another format", self.path)
            return None
        return state

    def save_json(self, name: str, value: Any) -> None:
        """Keep a small JSON file beside the state (atomically; uploaded like it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.on_save is not None:
            self.on_save(path)

    def load_json(self, name: str) -> Any | None:
        """A file :meth:`save_json` kept, or None."""
        try:
            return json.loads((self.folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (temporary file, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{FILE}.{uuid.uuid4().hex}.tmp"
        try:
            torch.save({**state, "version": VERSION}, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last = time.monotonic()
        if self.on_save is not None:
            self.on_save(self.path)
        log.info(
            "checkpoint saved: epoch %s, %s batches into the next, step %s",
            state.get("epochs_done"),
            state.get("batches_done"),
            state.get("step"),
        )

    def due(self) -> bool:
        """Whether a mid-epoch save is wanted now."""
        return self.every_seconds is not None and time.monotonic() - self._last >= (
            self.every_seconds
        )


def rng_state() -> dict[str, Any]:
    """Every random generator a training loop draws from (dropout, shuffles)."""
    # numpy's key array goes as a tensor: the checkpoint loads with weights_only.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    epochs_done: int,
    batches_done: int,
    step: int,
    loop: dict[str, Any],
) -> dict[str, Any]:
    """What :meth:`Checkpointer.save` stores for a loop at this point.

    ``epochs_done`` full epochs plus ``batches_done`` batches of the next one;
    ``loop`` is the loop's own bookkeeping (history, best so far, loss sums).
    """
    return {
        "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epochs_done": epochs_done,
        "batches_done": batches_done,
        "step": step,
        "loop": loop,
        "rng": rng_state(),
    }


@dataclass
class Resume:
    """Where a loop starts: from scratch (the defaults) or from a checkpoint."""

    epochs_done: int = 0
    batches_done: int = 0
    step: int = 0
    loop: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False

    def metrics(self) -> dict[str, Any]:
        """What the step's metrics say about it (nothing for a fresh run)."""
        if not self.resumed:
            return {}
        return {
            "resumed_from_epoch": self.epochs_done,
            "resumed_from_batch": self.batches_done,
            "resumed_from_step": self.step,
        }


def resume_training(
    checkpoint: Checkpointer | None, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> Resume:
    """Load the last saved state (if any) into a freshly built model, optimizer, scheduler.

    The model must already sit on its device (the optimizer's state follows
    its parameters there).
    """
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return Resume()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info(
        "resuming from checkpoint: epoch %s done, %s batches into the next, step %s",
        state["epochs_done"],
        state["batches_done"],
        state["step"],
    )
    return Resume(
        epochs_done=int(state["epochs_done"]),
        batches_done=int(state["batches_done"]),
        step=int(state["step"]),
        loop=dict(state["loop"]),
        resumed=True,
    )


def pinned_scratch_tokenizer(
    texts: Sequence[str], vocab: str, checkpoint: Checkpointer | None
) -> Any:
    """A from-scratch tokenizer that stays the same across a job's attempts.

    The first attempt learns it and keeps it beside the checkpoint; a resumed
    one rebuilds it from there (see :func:`pipeline.preprocess.scratch_tokenizer`).
    """
    from pipeline.preprocess import VOCAB_FILE, scratch_tokenizer, tokenizer_spec

    pinned = checkpoint.load_json(VOCAB_FILE) if checkpoint is not None else None
    tokenizer = scratch_tokenizer(texts, vocab, pinned)
    if checkpoint is not None and pinned is None:
        checkpoint.save_json(VOCAB_FILE, tokenizer_spec(tokenizer))
    elif pinned is not None:
        log.info("vocabulary of %d entries from the checkpoint", len(tokenizer))
    return tokenizer
