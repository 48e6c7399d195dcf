"""The killable child of a heavy step: its log lines come back, and it dies with its worker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.stack import REPO
from workers.isolate import run_killable


def _logs_and_answers(progress: object = None, *, value: int) -> int:
    logging.getLogger("pipeline.fake").info("working on %d", value)
    return value * 2


def test_child_log_records_reach_the_parent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    result = run_killable(
        _logs_and_answers, value=21, progress=lambda f, s=None: None, cancelled=threading.Event()
    )
    assert result == 42
    assert ("pipeline.fake", logging.INFO, "working on 21") in caplog.record_tuples


PARENT = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from workers.isolate import run_killable

    def sleeper(pid_file, progress=None):
        import os
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        run_killable(sleeper, sys.argv[1], progress=lambda f, s=None: None,
                     cancelled=threading.Event())
    """
)


def test_child_dies_when_its_worker_is_killed_hard(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT, encoding="utf-8")
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert parent.poll() is None, "the parent exited early"
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        child = psutil.Process(int(pid_file.read_text()))
        assert child.is_running()
        parent.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can act
        parent.wait(10)
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the step's child outlived its worker"
    finally:
        if parent.poll() is None:
            parent.kill()
