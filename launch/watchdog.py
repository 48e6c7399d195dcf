"""Kill a supervisor's process groups once the supervisor is gone.

Run as a script (``python launch/watchdog.py``, importing nothing of the
project) by :class:`launch.procs.ProcessGroup` with ``die_with_parent``. It
reads lines from stdin, a pipe whose write end only the supervisor holds:
``+PGID`` when a child group starts, ``-PGID`` when the supervisor has stopped
it. End of file means the supervisor closed the pipe or died (SIGKILL, OOM):
every group still listed then gets SIGKILL, and the watchdog exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable


def read_groups(lines: Iterable[str]) -> set[int]:
    """Follow the ``+PGID``/``-PGID`` lines until end of file; the groups left."""
    groups: set[int] = set()
    for raw in lines:
        line = raw.strip()
        if len(line) < 2 or not line[1:].isdigit():
            continue
        pgid = int(line[1:])
        if line[0] == "+":
            groups.add(pgid)
        elif line[0] == "-":
            groups.discard(pgid)
    return groups


def main() -> None:
    # End of file ends it, not a Ctrl-C or hang-up meant for the supervisor.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for pgid in read_groups(sys.stdin):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    main()
