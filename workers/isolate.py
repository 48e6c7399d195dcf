"""Run a heavy step in a child process, so that a cancel stops it at once.

``torch.onnx.export``, ONNX Runtime's ``optimize_model`` and
``quantize_dynamic`` and an evaluation's latency loop run for minutes at
bert-base size without calling back, so a cancel noticed between progress
reports would wait for them. :func:`run_killable` runs the step function in
a child process instead: the child sends its progress reports and its result
over a pipe, and the job's side kills it (SIGKILL) as soon as the job's
heartbeat sees the cancel request.

Children come from a ``forkserver`` that has imported the step modules once
(torch, ONNX, ONNX Runtime): each step then starts in milliseconds, from a
process that never ran a thread pool or touched CUDA, which ``fork`` of the
worker itself could not promise.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from pipeline.common import JobCancelled, StepError
from pipeline.runtime import torch_threads

log = logging.getLogger(__name__)

T = TypeVar("T")
# Imported once by the fork server, so every child starts with them loaded.
PRELOAD = [
    "pipeline.export",
    "pipeline.optimize",
    "pipeline.quantize",
    "pipeline.evaluate",
    "pipeline.train",
    "pipeline.pretrain",
    "pipeline.prune",
    "pipeline.distill",
]
POLL_SECONDS = 0.1
_context: BaseContext | None = None
_context_lock = threading.Lock()


def _mp_context() -> BaseContext:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def run_killable(
    fn: Callable[..., T],
    /,
    *args: Any,
    progress: Callable[[float, str | None], None],
    cancelled: threading.Event,
    step_threads: int | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs, progress=…)`` in a child process; killed when ``cancelled`` is set.

    ``fn`` and its arguments must be picklable (a module-level step function,
    paths, numbers). ``progress`` is called here with each report the child
    sends (it may raise :class:`JobCancelled`, which kills the child too);
    ``step_threads`` caps torch's CPU threads in the child. A
    :class:`StepError` in the child is raised here with its message; any
    other exception as a :class:`RuntimeError` carrying its traceback.
    """
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    name = getattr(fn, "__name__", "step")
    with _children_allowed():  # the Process copies the current process's config
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=_child,
            args=(fn, args, kwargs, sender, step_threads, os.getpid()),
            name=f"step-{name}",
            daemon=True,
        )
        proc.start()
    sender.close()
    finished = False
    try:
        while True:
            if cancelled.is_set():
                raise JobCancelled("cancelled by request")
            if not receiver.poll(POLL_SECONDS):
                if not proc.is_alive() and not receiver.poll():
                    raise StepError(f"the {name} process died (exit code {proc.exitcode})")
                continue
            try:
                message = receiver.recv()
            except EOFError:
                proc.join(5)
                raise StepError(f"the {name} process died (exit code {proc.exitcode})") from None
            if message[0] == "progress":
                progress(message[1], message[2])
            elif message[0] == "log":
                logging.getLogger(message[2]).log(message[1], "%s", message[3])
            elif message[0] == "done":
                finished = True
                result: T = message[1]
                return result
            elif message[0] == "step_error":
                raise StepError(message[1])
            else:
                raise RuntimeError(f"{message[1]}\n(in the {name} process)\n{message[2]}")
    finally:
        if finished:
            proc.join(2)  # after its result, the child is only exiting
        if proc.is_alive():
            log.info("stopping the %s process %s", name, proc.pid)
            proc.kill()
        proc.join(10)
        receiver.close()


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a Celery pool process start the step's child.

    The pool process is marked daemonic, and multiprocessing refuses children
    to a daemonic process because it could not wait for them when it exits;
    :func:`run_killable` always kills and joins its child before returning, so
    that does not apply. Its authentication key is billiard's, which refuses to
    be pickled for the fork server: multiprocessing's own type, same bytes.
    """
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    saved = dict(config)
    config["daemon"] = False
    if "authkey" in config:
        key = bytes(config["authkey"])
        config["authkey"] = multiprocessing.process.AuthenticationString(key)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


def _child(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    conn: Connection,
    threads: int | None,
    worker_pid: int,
) -> None:
    """The child's side: run the step, send progress, log records and the outcome up the pipe."""
    _die_with(worker_pid)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:  # a step's own threads may log too
            conn.send(message)

    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(send)]
    root.setLevel(logging.INFO)

    def report(fraction: float, stage: str | None = None) -> None:
        send(("progress", float(fraction), stage))

    try:
        with torch_threads(threads):
            result = fn(*args, **kwargs, progress=report)
        send(("done", result))
    except StepError as exc:
        send(("step_error", str(exc)))
    except BaseException as exc:
        send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8)))
    finally:
        conn.close()


class _PipeHandler(logging.Handler):
    """Sends the child's log records to the job's side, which logs them again there.

    So a step's own lines (``pipeline.train: epoch 1/2 …``) reach the job's log
    and the worker's output as if the step had run in the worker.
    """

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        # The job's side may be gone already: the child is about to be killed then.
        with contextlib.suppress(Exception):
            self._send(("log", record.levelno, record.name, record.getMessage()))


def _die_with(worker_pid: int) -> None:
    """SIGKILL this child as soon as the worker that started it exits.

    A worker killed hard (SIGKILL, OOM) runs no cleanup, and the fork server
    stays up while any of its children lives (each holds its "alive" pipe), so
    ``PR_SET_PDEATHSIG`` would never fire: a thread waits on a pidfd of the
    worker instead. Without one, a long training child would run on beside
    the job's next attempt, writing its checkpoints.
    """
    try:
        fd: int | None = os.pidfd_open(worker_pid)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (AttributeError, OSError):  # no pidfds here: poll the pid
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(worker_pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-worker", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
