"""A self-contained HTML page for a pipeline's comparison report (table + SVG chart)."""

from __future__ import annotations

import html
from typing import Any

from textcls.report import REPORT_COLUMNS as COLUMNS
from textcls.report import format_cell, report_rows


def _fmt(key: str, value: Any) -> str:
    return html.escape(format_cell(key, value))


def _chart(variants: list[dict[str, Any]], width: int = 640, height: int = 360) -> str:
    """Accuracy (y) against batch-1 p50 latency (x, log scale) as inline SVG."""
    import math

    pts = [v for v in variants if v.get("accuracy") is not None and v.get("latency_p50_ms")]
    if not pts:
        return "<p>No evaluated variants to plot.</p>"
    pad_l, pad_r, pad_t, pad_b = 70, 20, 20, 50
    xs = [math.log10(max(v["latency_p50_ms"], 1e-3)) for v in pts]
    ys = [v["accuracy"] * 100 for v in pts]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y0, y1 = min(ys) - 1.0, max(ys) + 1.0

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

    parts = [
        f'<svg id="tradeoff-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="accuracy against latency">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" '
        'stroke="#333"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#333"/>',
        f'<text x="{(width + pad_l) / 2}" y="{height - 12}" text-anchor="middle" '
        'font-size="13">latency p50 at batch 1 (ms, log scale)</text>',
        f'<text x="16" y="{(height - pad_b) / 2}" text-anchor="middle" font-size="13" '
        f'transform="rotate(-90 16 {(height - pad_b) / 2})">accuracy (%)</text>',
    ]
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{pad_l - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{yv:.1f}</text>'
        )
        xv = x0 + (x1 - x0) * i / 4
        parts.append(
            f'<text x="{sx(xv):.1f}" y="{height - pad_b + 16}" text-anchor="middle" '
            f'font-size="11">{10**xv:.3g}</text>'
        )
    for v, x, y in zip(pts, xs, ys, strict=True):
        color = (
            "#d62728" if v.get("chosen") else ("#2ca02c" if v.get("within_budget") else "#7f7f7f")
        )
        label = html.escape(f"{v['step']} ({v['format']})")
        parts.append(
            f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color}">'
            f"<title>{label}: {y:.2f}% at {v['latency_p50_ms']:.3g} ms</title></circle>"
            f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 8:.1f}" font-size="11">{label}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _verdict(verdict: str | None) -> str:
    if not verdict:
        return ""
    cls = "verdict below" if verdict.startswith("BELOW BASELINE") else "verdict"
    return f'<p class="{cls}" id="verdict">{html.escape(verdict)}</p>'


def render_report(report: dict[str, Any], status: str) -> str:
    variants = report.get("variants", [])
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    rows = []
    for v in report_rows(report):
        cls = ' class="chosen"' if v.get("chosen") else ""
        if v.get("model_id") is None:
            cls = ' class="baseline"'  # the TF-IDF yardstick: not a model of the pipeline
        cells = "".join(f"<td>{_fmt(k, v.get(k))}</td>" for k, _ in COLUMNS)
        rows.append(f"<tr{cls}>{cells}</tr>")
    chosen = report.get("chosen_model_id")
    title = f"textcls pipeline {report.get('pipeline_job_id')} — comparison"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
tr.chosen {{ background: #fff3c4; font-weight: bold; }}
tr.baseline {{ color: #555; font-style: italic; }}
p.verdict {{ font-weight: bold; }} p.below {{ color: #b00020; }}
.legend span {{ margin-right: 1.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Status: <b>{html.escape(status)}</b>.
Target device: <b>{html.escape(str(report.get("target_device")))}</b>.
Accuracy budget: at most <b>{report.get("max_accuracy_drop")}</b> points below the first model
({_fmt("accuracy", report.get("baseline_accuracy"))}) on dataset {report.get("eval_dataset_id")}.
Chosen: <b>{f"model {chosen}" if chosen is not None else "none yet"}</b>
— {html.escape(str(report.get("selection", "")))}.</p>
{_verdict(report.get("verdict"))}
<table id="variants"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Accuracy against latency</h2>
<p class="legend"><span style="color:#d62728">● chosen</span>
<span style="color:#2ca02c">● within budget</span>
<span style="color:#7f7f7f">● over budget</span></p>
{_chart(variants)}
</body></html>
"""
