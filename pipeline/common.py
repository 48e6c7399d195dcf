"""Small types shared by every pipeline step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class JobCancelled(Exception):
    """Raised by a progress callback to stop a step between batches."""


class ProgressFn(Protocol):
    def __call__(self, fraction: float, stage: str | None = None) -> None:
        """Report progress in 0..1; may raise :class:`JobCancelled`."""


def no_progress(fraction: float, stage: str | None = None) -> None:
    """The default progress callback: does nothing."""


class StepError(ValueError):
    """A step was given input it cannot work with (wrong format, label mismatch...)."""


ProgressCallable = Callable[[float, str | None], None]
