"""Shared helpers for the benchmarks: statistics, machine facts, JSON and table output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO / "textcls-data" / "bench"


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / count of latencies in milliseconds."""
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": float(statistics.fmean(ms)) if ms else float("nan"),
        "n": len(ms),
    }


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(vals)) if vals else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of per-round values: how much the rounds disagreed."""
    vals = [v for v in values if v == v]
    if len(vals) < 2:
        return 0.0
    mid = statistics.median(vals)
    return float((max(vals) - min(vals)) / mid) if mid else float("nan")


def rotated(items: Sequence[Any], round_no: int) -> list[Any]:
    """``items`` rotated by the round number, so no variant always runs first."""
    if not items:
        return []
    k = round_no % len(items)
    return list(items[k:]) + list(items[:k])


# --------------------------------------------------------------------------- machine facts


@dataclass
class CpuInfo:
    model: str
    cores: int
    mhz: float
    flags: list[str]
    fp32_flops_per_cycle: int
    fp32_basis: str
    int8_ops_per_cycle: int
    int8_basis: str
    amx_int8_ops_per_cycle: int

    def peak_fp32_gflops(self, cores: int | None = None) -> float:
        return (cores or self.cores) * self.mhz / 1000.0 * self.fp32_flops_per_cycle

    def peak_int8_gops(self, cores: int | None = None) -> float:
        return (cores or self.cores) * self.mhz / 1000.0 * self.int8_ops_per_cycle

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cores": self.cores,
            "mhz": self.mhz,
            "flags": self.flags,
            "fp32_flops_per_cycle_per_core": self.fp32_flops_per_cycle,
            "fp32_basis": self.fp32_basis,
            "int8_ops_per_cycle_per_core": self.int8_ops_per_cycle,
            "int8_basis": self.int8_basis,
            "amx_int8_ops_per_cycle_per_core": self.amx_int8_ops_per_cycle,
            "peak_fp32_gflops": round(self.peak_fp32_gflops(), 1),
            "peak_int8_gops": round(self.peak_int8_gops(), 1),
        }


INTERESTING_FLAGS = (
    "avx",
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_info() -> CpuInfo:
    """Cores, clock and vector units from /proc/cpuinfo, with the peak rates they allow.

    fp32: two FMA ports x vector lanes x 2 FLOPs (an FMA is a multiply and an
    add): AVX-512 16 lanes -> 64 FLOPs/cycle, AVX2 8 lanes -> 32. int8:
    ``VPDPBUSD`` (VNNI) does 4 multiply-adds per 32-bit lane, so a 512-bit
    register holds 64 MACs; two ports -> 128 MACs = 256 ops/cycle (AVX2-VNNI
    or plain AVX2 ``VPMADDUBSW`` + ``VPMADDWD``: half that or less). AMX
    (``TDPBUSD``) peaks at 1024 int8 MACs/cycle; it is listed separately
    because only some ONNX Runtime kernels use it. AMD Zen 4 (family 25,
    model >= 0x10) runs AVX-512 on 256-bit datapaths ("double pumped"): two
    256-bit FMA pipes -> 32 fp32 FLOPs/cycle, and one 512-bit ``VPDPBUSD``
    per cycle -> 64 MACs = 128 int8 ops/cycle; both halve the Intel figures.
    The clock is the one /proc/cpuinfo reports (nominal under a hypervisor;
    turbo is not counted).
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = _first(r"^model name\s*:\s*(.+)$", text) or platform.processor() or "unknown"
    mhz_s = _first(r"^cpu MHz\s*:\s*([\d.]+)$", text)
    mhz = float(mhz_s) if mhz_s else 0.0
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz.exists():
        with contextlib.suppress(ValueError):
            mhz = max(mhz, int(max_khz.read_text().strip()) / 1000.0)
    flags_s = _first(r"^flags\s*:\s*(.+)$", text) or ""
    flags = set(flags_s.split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if "avx512f" in flags:
        fp32, fp32_basis = 64, "AVX-512: 2 FMA ports x 16 fp32 lanes x 2 FLOPs"
    elif "avx2" in flags and "fma" in flags:
        fp32, fp32_basis = 32, "AVX2: 2 FMA ports x 8 fp32 lanes x 2 FLOPs"
    elif "avx" in flags:
        fp32, fp32_basis = 16, "AVX: 8 fp32 lanes, separate mul and add"
    else:
        fp32, fp32_basis = 8, "SSE: 4 fp32 lanes, separate mul and add"
    if "avx512_vnni" in flags:
        int8, int8_basis = 256, "AVX-512 VNNI: 2 ports x 64 int8 MACs x 2 ops"
    elif "avx_vnni" in flags:
        int8, int8_basis = 128, "AVX-VNNI (256-bit): 2 ports x 32 int8 MACs x 2 ops"
    elif "avx512bw" in flags:
        int8, int8_basis = 128, "AVX-512BW without VNNI: VPMADDUBSW+VPMADDWD, ~half VNNI"
    elif "avx2" in flags:
        int8, int8_basis = 64, "AVX2 without VNNI: VPMADDUBSW+VPMADDWD"
    else:
        int8, int8_basis = 16, "no int8 dot-product instructions"
    amx = 2048 if "amx_int8" in flags else 0
    family = int(_first(r"^cpu family\s*:\s*(\d+)$", text) or 0)
    cpu_model = int(_first(r"^model\s*:\s*(\d+)$", text) or 0)
    zen4 = "AuthenticAMD" in text and family == 25 and cpu_model >= 0x10
    if zen4 and "avx512f" in flags:
        fp32, fp32_basis = 32, "AMD Zen 4 AVX-512 on 256-bit pipes: 2 FMA x 8 fp32 lanes x 2"
        if "avx512_vnni" in flags:
            int8, int8_basis = 128, "Zen 4 VNNI: 1 x 512-bit VPDPBUSD/cycle = 64 MACs x 2"
    return CpuInfo(
        model=model.strip(),
        cores=cores,
        mhz=mhz,
        flags=[f for f in INTERESTING_FLAGS if f in flags],
        fp32_flops_per_cycle=fp32,
        fp32_basis=fp32_basis,
        int8_ops_per_cycle=int8,
        int8_basis=int8_basis,
        amx_int8_ops_per_cycle=amx,
    )


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1) if m else None


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by a process and its live descendants.

    Read from ``/proc`` (Linux); ``None`` elsewhere or if the process is gone.
    On a shared machine this is the load-independent cost of a request:
    wall-clock time stretches with other processes' load, CPU time much less.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    proc = Path("/proc")
    if not (proc / str(pid) / "stat").exists():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; fields resume after ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        parent = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        stats[int(entry.name)] = (parent, (utime + stime + cutime + cstime) / tick)
    total = 0.0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current in seen or current not in stats:
            continue
        seen.add(current)
        total += stats[current][1]
        todo.extend(p for p, (parent, _) in stats.items() if parent == current)
    return total


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    """What produced the numbers: commit, versions, CPU, load."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info().as_dict(),
        "loadavg_start": loadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    for name in ("torch", "onnxruntime", "transformers", "fastapi", "uvicorn", "httpx"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except ImportError:
            env[name] = None
    return env


# --------------------------------------------------------------------------- output


def write_result(result: dict[str, Any], json_path: Path | None) -> None:
    """The result as JSON to ``json_path``, or to stdout when none is given."""
    result.setdefault("environment", {})["loadavg_end"] = loadavg()
    text = json.dumps(result, indent=2, default=_json_default, ensure_ascii=False)
    if json_path is None:
        sys.stdout.write(text + "\n")
    else:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n", encoding="utf-8")
        log.info("wrote %s", json_path)


Table = tuple[str, Sequence[str], Sequence[Sequence[Any]]]


def report(
    result: dict[str, Any],
    make_tables: Callable[[dict[str, Any]], Sequence[Table]],
    *,
    json_path: Path | None,
    markdown_path: Path | None,
) -> None:
    """Print a benchmark's tables, optionally as Markdown too, and write its JSON.

    The tables are built from the JSON round trip of ``result`` (keys become
    strings), so what is printed is exactly what is written.
    """
    result = json.loads(json.dumps(result, default=str))
    tabs = make_tables(result)
    for title, cols, rows in tabs:
        print_table(title, cols, rows)
    if markdown_path:
        markdown_path.write_text(
            "\n\n".join(f"**{t}**\n\n{markdown_table(c, r)}" for t, c, r in tabs) + "\n"
        )
    write_result(result, json_path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A readable table on stderr (stdout may carry the JSON)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    Console(stderr=True, width=200).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub Markdown (for README's Benchmarks section)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
