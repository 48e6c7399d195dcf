"""Small types shared by every pipeline step."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, Protocol


class JobCancelled(Exception):
    """Raised by a progress callback to stop a step between batches."""


class ProgressFn(Protocol):
    def __call__(self, fraction: float, stage: str | None = None) -> None:
        """Report progress in 0..1; may raise :class:`JobCancelled`."""


def no_progress(fraction: float, stage: str | None = None) -> None:
    """The default progress callback: does nothing."""


class StepError(ValueError):
    """A step was given input it cannot work with (wrong format, label mismatch...)."""


def run_cli_step(step: Callable[[], Any]) -> int:
    """Run a step for its CLI: print its metrics as JSON (exit 0) or its error (exit 2)."""
    try:
        result = step()
    except StepError as exc:
        logging.getLogger("pipeline").error("%s", exc)
        return 2
    metrics = getattr(result, "metrics", result)
    sys.stdout.write(json.dumps(metrics, indent=2, default=str) + "\n")
    return 0


def add_training_args(
    parser: argparse.ArgumentParser, *, epochs: int, max_length: int = 128
) -> None:
    """The common training options of a step's CLI (names as in the job params)."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None)


def training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed common training options, as keyword arguments of a step."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        "seed": args.seed,
        "device": args.device,
    }
