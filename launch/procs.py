"""Child processes started in their own sessions and stopped as a group; ports.

A group made with ``die_with_parent=True`` (the embedded stack's) makes sure no
child outlives the process that started it, however that process ends,
``SIGKILL`` and the OOM killer included, in two ways:

- each child gets ``PR_SET_PDEATHSIG`` = ``SIGKILL`` (Linux): the kernel kills
  it when the thread that started it dies (so start children from the main
  thread);
- a watchdog process (:mod:`launch.watchdog`) holds the read end of a pipe
  whose write end only this process holds, and knows every child's process
  group (each child leads its own session, so its own children, e.g. Celery's
  pool, share its group). When this process dies the pipe reaches end of file
  and the watchdog kills every group still listed: the grandchildren go too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG = Path(__file__).with_name("watchdog.py")


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded before any fork (dlopen is not safe in a forked child)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGKILL this child when its parent thread dies."""

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll ``predicate()`` until true or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    # What started it, so that it can be started again (launch.supervisor).
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    inherit_output: bool = False
    started_at: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class ProcessGroup:
    """Child processes started in their own sessions and stopped together.

    With ``die_with_parent`` no child (nor its own children) outlives this
    process, even when it is killed with SIGKILL (see the module docstring).
    """

    log_dir: Path | None = None
    procs: list[Proc] = field(default_factory=list)
    die_with_parent: bool = False
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _tell_watchdog(self, line: str) -> None:
        if not self.die_with_parent:
            return
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, str(WATCHDOG)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # no terminal signal reaches it
            )
        assert self._watchdog.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._watchdog.stdin.write(f"{line}\n".encode())
            self._watchdog.stdin.flush()

    def close_watchdog(self) -> None:
        """Let the watchdog go (end of file); it kills any group still listed."""
        dog, self._watchdog = self._watchdog, None
        if dog is not None and dog.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                dog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                dog.wait(10)

    def start(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        inherit_output: bool = False,
    ) -> Proc:
        full_env = {**os.environ, **(env or {})}
        out: Any = subprocess.DEVNULL
        log_path = None
        if inherit_output:
            out = None
        elif self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            out = log_path.open("ab")
        popen = subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None,
        )
        if log_path is not None:
            out.close()  # the child holds its own copy
        # Its session id is its pid, and so is its process group's.
        self._tell_watchdog(f"+{popen.pid}")
        proc = Proc(name, popen, log_path, list(args), dict(env or {}), cwd, inherit_output)
        self.procs.append(proc)
        log.info("started %s (pid %d)", name, popen.pid)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process's whole group, then kill what is left after ``timeout``."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)
        # Children (e.g. Celery's pool) share the group; make sure none outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        self._tell_watchdog(f"-{proc.popen.pid}")
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        self.close_watchdog()


@contextlib.contextmanager
def process_group(
    log_dir: Path | None = None, die_with_parent: bool = False
) -> Iterator[ProcessGroup]:
    group = ProcessGroup(log_dir=log_dir, die_with_parent=die_with_parent)
    try:
        yield group
    finally:
        group.stop_all()
