"""Restart the children of a :class:`launch.procs.ProcessGroup` that die.

``textcls up`` calls :meth:`Supervisor.check` from its main loop (the main
thread: children get ``PR_SET_PDEATHSIG``, which follows the thread that
started them). A child found dead is logged with why (exit code or signal) and
the last lines of its log, what is left of its process group is killed, and it
is started again with the same command line and environment after a backoff:
``initial`` seconds, doubling on each death in a row up to ``maximum``; a child
that stayed up ``reset_after`` seconds starts from ``initial`` again.

Child output goes to the log through :mod:`logging` only, as plain text: it is
never read as markup (a line such as ``[/inner/bert/MatMul]`` once crashed the
supervisor when printed through rich).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launch.procs import Proc, ProcessGroup

log = logging.getLogger(__name__)


def exit_reason(returncode: int | None) -> str:
    """``exited with code 3`` or ``killed by SIGKILL`` (Popen's negative codes)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 30.0

    def delay(self, deaths_in_a_row: int) -> float:
        """Seconds to wait before the restart after the n-th death in a row (n >= 1)."""
        return float(min(self.maximum, self.initial * 2 ** max(0, deaths_in_a_row - 1)))


@dataclass(frozen=True)
class Death:
    """One child found dead, and when it will be started again."""

    name: str
    pid: int
    reason: str
    uptime: float
    delay: float
    tail: str


@dataclass
class _Pending:
    proc: Proc
    due: float


@dataclass
class Supervisor:
    group: ProcessGroup
    backoff: Backoff = field(default_factory=Backoff)
    tail_lines: int = 20
    clock: Callable[[], float] = time.monotonic
    deaths: list[Death] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    _in_a_row: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, _Pending] = field(default_factory=dict)

    def check(self) -> list[Death]:
        """Note the children that died since the last call; restart those now due."""
        found = [self._bury(p) for p in list(self.group.procs) if not p.alive()]
        now = self.clock()
        for name, pending in list(self._pending.items()):
            if now >= pending.due:
                del self._pending[name]
                self._start_again(pending.proc)
        return found

    def _bury(self, proc: Proc) -> Death:
        uptime = proc.uptime()
        in_a_row = 1 if uptime >= self.backoff.reset_after else self._in_a_row.get(proc.name, 0) + 1
        self._in_a_row[proc.name] = in_a_row
        death = Death(
            name=proc.name,
            pid=proc.popen.pid,
            reason=exit_reason(proc.popen.returncode),
            uptime=uptime,
            delay=self.backoff.delay(in_a_row),
            tail=proc.tail(self.tail_lines),
        )
        self.group.stop(proc)  # kill what is left of its group (e.g. a Celery pool child)
        self._pending[proc.name] = _Pending(proc, self.clock() + death.delay)
        self.deaths.append(death)
        log.warning(
            "%s (pid %d) %s after %.1f s up; restarting it in %.0f s. Last lines of its log:\n%s",
            death.name,
            death.pid,
            death.reason,
            death.uptime,
            death.delay,
            death.tail or "(no log)",
        )
        return death

    def _start_again(self, proc: Proc) -> None:
        try:
            new = self.group.start(proc.name, proc.args, proc.env, proc.cwd, proc.inherit_output)
        except OSError as exc:  # e.g. the interpreter vanished: try again later
            in_a_row = self._in_a_row.get(proc.name, 0) + 1
            self._in_a_row[proc.name] = in_a_row
            delay = self.backoff.delay(in_a_row)
            self._pending[proc.name] = _Pending(proc, self.clock() + delay)
            log.error("could not restart %s (%s); next try in %.0f s", proc.name, exc, delay)
            return
        self.restarts[proc.name] = self.restarts.get(proc.name, 0) + 1
        log.warning(
            "restarted %s (pid %d; restart %d)",
            proc.name,
            new.popen.pid,
            self.restarts[proc.name],
        )
