"""Devices and mixed precision for the training-like steps and the runtimes.

One place that turns a ``device`` string (``auto``, ``cpu``, ``cuda``,
``cuda:N``; ``gpu`` is accepted as ``cuda`` on the command line) into a
``torch.device``, with an error that names what was asked for and what this
machine has; and the mixed-precision recipe on CUDA: bf16 autocast where the
GPU supports it (no loss scaling needed), else fp16 autocast with a
``GradScaler``. The CPU path is fp32, no autocast, no scaler, exactly as
before this module existed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.common import StepError

DEVICE_RE = re.compile(r"^(auto|cpu|gpu|cuda)(:(\d{1,3}))?$")
USAGE = "use auto, cpu, cuda or cuda:N"


def parse_device(device: str | None) -> tuple[str, int | None]:
    """``("auto" | "cpu" | "cuda", index or None)``; raises StepError for anything else."""
    name = (device or "auto").strip().lower()
    m = DEVICE_RE.match(name)
    if m is None or (m.group(2) and m.group(1) != "cuda"):
        raise StepError(f"unknown device {device!r} ({USAGE})")
    kind = "cuda" if m.group(1) == "gpu" else m.group(1)
    return kind, int(m.group(3)) if m.group(3) is not None else None


def torch_devices() -> str:
    """What this process's torch can run on, in words (for error messages and logs)."""
    version = torch.__version__
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        return (
            f"this worker has no CUDA device (torch {version}, CUDA build {built}: "
            "torch.cuda.is_available() is False, device_count 0)"
        )
    n = torch.cuda.device_count()
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n))
    return f"this worker has {n} CUDA device(s): {names} (torch {version})"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU.

    An explicit CUDA request on a machine without CUDA (or without that device
    index) is an error rather than a silent, much slower CPU run.
    """
    if isinstance(device, torch.device):
        return device
    kind, index = parse_device(device)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StepError(f"device {device!r} was requested but {torch_devices()}")
    if index is not None and index >= torch.cuda.device_count():
        raise StepError(f"device {device!r} was requested but {torch_devices()}")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs on a device: fp32, or autocast to bf16 / fp16."""

    device_type: str
    dtype: torch.dtype | None  # None: fp32, autocast off

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")  # type: ignore[arg-type]

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(
            device_type=self.device_type,
            dtype=self.dtype or torch.float32,
            enabled=self.dtype is not None,
        )

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (bf16 has fp32's range and needs none)."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


def precision_for(device: torch.device) -> Precision:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU.

    The CPU stays in fp32: bf16 autocast on CPU is slower on most hosts.
    """
    if device.type != "cuda":
        return Precision(device.type, None)
    if torch.cuda.is_bf16_supported():
        return Precision("cuda", torch.bfloat16)
    return Precision("cuda", torch.float16)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory, without blocking the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Backward, clip the (unscaled) gradients at ``max_grad_norm``, step.

    With a ``scaler`` (fp16) the loss is scaled for backward, the gradients are
    unscaled before clipping, and a step with inf/NaN gradients is skipped.
    """
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()


class ScaledOptimizer:
    """The two calls TextBrewer's loop makes on its optimizer, around a GradScaler.

    TextBrewer owns distillation's loop: it calls ``loss.backward()``,
    ``optimizer.step()`` and ``optimizer.zero_grad()``. With fp16 the loss it
    gets is already scaled (see :mod:`pipeline.distill`), its own clipping is
    off, and ``step`` here unscales, clips and steps (or skips) as
    :func:`optimizer_step` does.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        params: Iterable[torch.nn.Parameter],
        max_grad_norm: float,
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.params = list(params)
        self.max_grad_norm = max_grad_norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work (so a timer measures it); nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
