"""Child process groups: no child, nor a child's child, outlives a SIGKILLed parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from launch.procs import ProcessGroup
from launch.watchdog import read_groups

REPO = Path(__file__).resolve().parents[2]

# A parent that starts two children with die_with_parent, one of which starts a
# child of its own (like a Celery worker's pool), writes every pid, then waits.
PARENT = """
import json, subprocess, sys, time
from pathlib import Path
from launch.procs import ProcessGroup

group = ProcessGroup(log_dir=Path(sys.argv[1]), die_with_parent=True)
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
forker = [sys.executable, "-c",
          "import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
          "time.sleep(300)"]
a = group.start("a", sleeper)
b = group.start("b", forker)
Path(sys.argv[2]).write_text(json.dumps([a.popen.pid, b.popen.pid, group._watchdog.pid]))
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_watchdog_protocol() -> None:
    assert read_groups(["+10\n", "+11\n", "-10\n", "junk\n", "+\n", "+12", "-99"]) == {11, 12}


def test_sigkill_of_the_parent_kills_children_and_grandchildren(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "logs"), str(pids_file)],
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not pids_file.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "parent failed"
            time.sleep(0.05)
        a, b, dog = json.loads(pids_file.read_text())
        while not psutil.Process(b).children():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        grandchild = psutil.Process(b).children()[0].pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        ours = [a, b, grandchild, dog]
        while not all(_gone(p) for p in ours):
            left = [p for p in ours if not _gone(p)]
            assert time.monotonic() < deadline, f"still running after 5 s: {left}"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


def test_stop_all_lets_the_watchdog_go(tmp_path: Path) -> None:
    group = ProcessGroup(log_dir=tmp_path, die_with_parent=True)
    proc = group.start("a", [sys.executable, "-c", "import time; time.sleep(300)"])
    dog = group._watchdog
    assert dog is not None and dog.poll() is None
    group.stop_all()
    assert not proc.alive() and dog.poll() == 0 and group._watchdog is None
