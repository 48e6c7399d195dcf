"""The supervisor on real child processes: restarts, backoff, why, no markup crash."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.procs import ProcessGroup
from launch.supervisor import Backoff, Supervisor, exit_reason

# An ONNX node name: read as rich markup it is a closing tag, and raised MarkupError.
MARKUP_LINE = "[/inner/bert/encoder/layer.0/attention/self/MatMul]"


def _until(predicate: object, timeout: float, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, (supervisor.deaths, supervisor.restarts)
        supervisor.check()
        time.sleep(0.02)


def test_exit_reasons() -> None:
    assert exit_reason(0) == "exited with code 0"
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert exit_reason(None) == "still running"


def test_backoff_doubles_to_its_cap() -> None:
    assert [Backoff().delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert Backoff(initial=0.5, maximum=3).delay(4) == 3


def test_a_child_that_keeps_dying_is_restarted_with_backoff_and_its_log_is_plain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    group = ProcessGroup(log_dir=tmp_path)
    script = f"print({MARKUP_LINE!r}, flush=True); raise SystemExit(3)"
    group.start("flaky", [sys.executable, "-c", script])
    supervisor = Supervisor(group, Backoff(initial=0.1, maximum=0.4, reset_after=60))
    with caplog.at_level(logging.WARNING, logger="launch.supervisor"):
        try:
            _until(lambda: supervisor.restarts.get("flaky", 0) >= 4, 30, supervisor)
        finally:
            group.stop_all()
    deaths = supervisor.deaths[:4]
    assert [d.reason for d in deaths] == ["exited with code 3"] * 4
    assert [d.delay for d in deaths] == [0.1, 0.2, 0.4, 0.4]
    assert all(MARKUP_LINE in d.tail for d in deaths)
    # The log says who died, why, and quotes its output verbatim.
    messages = [r.getMessage() for r in caplog.records]
    died = [m for m in messages if m.startswith("flaky (pid")]
    assert len(died) >= 4 and "exited with code 3" in died[0] and MARKUP_LINE in died[0]
    assert any(m.startswith("restarted flaky (pid") for m in messages)


def test_backoff_resets_after_a_child_stayed_up(tmp_path: Path) -> None:
    group = ProcessGroup(log_dir=tmp_path)
    group.start("slow", [sys.executable, "-c", "import time; time.sleep(0.4)"])
    supervisor = Supervisor(group, Backoff(initial=0.05, maximum=5, reset_after=0.3))
    try:
        _until(lambda: supervisor.restarts.get("slow", 0) >= 3, 30, supervisor)
    finally:
        group.stop_all()
    assert [d.delay for d in supervisor.deaths[:3]] == [0.05, 0.05, 0.05]


def test_a_killed_child_takes_its_own_children_along_and_comes_back(tmp_path: Path) -> None:
    """Like a Celery worker killed with its pool child: the group goes, a new one starts."""
    group = ProcessGroup(log_dir=tmp_path)
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        "time.sleep(300)"
    )
    first = group.start("parent", [sys.executable, "-c", script])
    supervisor = Supervisor(group, Backoff(initial=0.1))
    try:
        leader = psutil.Process(first.popen.pid)
        deadline = time.monotonic() + 20
        while not leader.children():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        grandchild = leader.children()[0]
        leader.kill()
        _until(lambda: supervisor.restarts.get("parent", 0) >= 1, 20, supervisor)
        grandchild.wait(5)  # raises TimeoutExpired if it outlived its group
        assert supervisor.deaths[0].reason == "killed by SIGKILL"
        (again,) = group.procs
        assert again.alive() and again.popen.pid != first.popen.pid
    finally:
        group.stop_all()
