"""bench/serving.py: its CPU accounting and the targets it derives from one run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bench.serving import process_cpu_s, tables, targets


def test_process_cpu_counts_a_busy_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: pass"])
    try:
        start = process_cpu_s(child.pid)
        time.sleep(1.0)
        used = process_cpu_s(child.pid) - start
    finally:
        child.kill()
        child.wait()
    assert 0.2 < used <= 1.2  # a spinning process: up to one core for the second
    assert process_cpu_s(os.getpid()) > 0


def _cell(rps: float, p50: float, p99: float) -> dict[str, Any]:
    cpu = {"server_cores": 1.5, "wrk_cores": 0.1}
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": 0, **cpu}


def test_targets_are_ratios_within_the_run() -> None:
    result: dict[str, Any] = {
        "config": {
            "concurrency": [1, 32],
            "shapes": ["chain"],
            "rounds": 1,
            "variants": ["worker", "handwritten"],
            "limit_parallel_calls": 2,
        },
        "summary": {
            "load": {
                "chain/worker": {"1": _cell(500, 1.0, 2.0), "32": _cell(1000, 30.0, 45.0)},
                "chain/handwritten": {"1": _cell(400, 1.2, 3.0), "32": _cell(900, 40.0, 150.0)},
            },
            "limit": {
                "chain": {"rps": 1000.0},
                "chain/arrival": {"rps": 950.0},
                "chain/parallel": {"rps": 1600.0},
            },
        },
    }
    result["targets"] = targets(result)
    met = {t["target"]: t["met"] for t in result["targets"]}
    assert met["c=32 p99 <= 2 x p50"] is True  # 45 / 30 = 1.5
    assert met["c=32 p99 <= handwritten's"] is True
    assert met["c=32 req/s >= 0.95 x in-process limit"] is True  # x1.00
    assert met["c=32 req/s >= 1.2 x handwritten"] is False  # 1000 / 900 = x1.11
    assert met["c=1 p50 <= handwritten's"] is True
    assert met["(not a target) c=32 req/s / in-process, calls at once"] is None
    measured = {t["target"]: t["measured"] for t in result["targets"]}
    assert measured["(not a target) c=32 req/s / in-process, calls at once"].endswith("x0.62")
    last = tables(result)[0][2][-1]
    assert last[1] == "in-process limit (length-sorted batches of 32, 2 calls at once)"
    cpu = next(rows for title, _cols, rows in tables(result) if title.startswith("CPU used"))
    assert cpu[0] == ["chain", "worker", 1.5, 1.5, 0.1, 0.1]
