"""The service command lines: defined once in launch.services, exec'd by the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch import services
from tests.launch.helpers import exec_argv


def test_worker_command_line() -> None:
    argv = services.worker_command("gpu", "w1", 3)
    assert argv[:3] == [sys.executable, "-m", "celery"]
    assert argv[argv.index("-A") + 1] == services.CELERY_APP
    assert argv[argv.index("-Q") + 1] == "gpu"
    assert argv[argv.index("-c") + 1] == "3"
    assert argv[argv.index("-n") + 1] == "w1@%h"
    assert set(services.WORKER_FLAGS) <= set(argv)
    assert services.worker_command() == services.worker_command("gpu,cpu", "worker", 1)


def test_uvicorn_command_lines() -> None:
    api = services.api_command("127.0.0.1", 9000)
    assert api[:5] == [sys.executable, "-m", "uvicorn", "--factory", services.API_APP]
    assert api[api.index("--port") + 1] == "9000"
    assert api[api.index("--log-level") + 1] == services.QUIET_LOG_LEVEL
    inf = services.inference_command("0.0.0.0", 8001, "info")
    assert inf[4] == services.INFERENCE_APP and inf[-2:] == ["--log-level", "info"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker"], services.worker_command()),
        (
            ["worker", "--queues", "cpu", "--concurrency", "2", "--name", "worker-cpu"],
            services.worker_command("cpu", "worker-cpu", 2),
        ),
        (
            ["api", "--host", "0.0.0.0", "--port", "8000"],
            services.api_command("0.0.0.0", 8000, "info"),
        ),
        (
            ["api", "--port", "8002", "--log-level", "warning"],
            services.api_command("127.0.0.1", 8002, "warning"),
        ),
        (
            ["inference", "--host", "0.0.0.0", "--port", "8001"],
            services.inference_command("0.0.0.0", 8001, "info"),
        ),
    ],
)
def test_cli_execs_the_service_command_line(
    args: list[str], expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEXTCLS_API_HOST", "127.0.0.1")
    from textcls.settings import get_settings

    get_settings.cache_clear()
    try:
        assert exec_argv(args, monkeypatch) == expected
    finally:
        get_settings.cache_clear()


def test_command_lines_import_no_service() -> None:
    """Building the command lines (and loading the CLI) imports none of the services."""
    code = (
        "import sys, launch.services, launch.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'api', 'workers', 'deploy'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
