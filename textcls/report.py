"""Columns and cell formatting of a pipeline's comparison report (CLI, HTML and demo)."""

from __future__ import annotations

from typing import Any

# (key in a report variant, column heading)
REPORT_COLUMNS: list[tuple[str, str]] = [
    ("step", "step"),
    ("model_id", "model"),
    ("format", "format"),
    ("layers", "layers"),
    ("heads", "heads"),
    ("ffn", "FFN"),
    ("size_bytes", "size MB"),
    ("accuracy", "acc %"),
    ("macro_f1", "F1 %"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("throughput_per_s", "sent/s"),
    ("drop_points", "drop (points)"),
    ("within_budget", "in budget"),
    ("chosen", "chosen"),
]


def format_cell(key: str, value: Any) -> str:
    """One report value as text: sizes in MB, accuracies in percent."""
    if value is None:
        return "-"
    if key == "size_bytes":
        return f"{value / 1e6:.2f}"
    if key in ("accuracy", "macro_f1"):
        return f"{value * 100:.2f}"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
