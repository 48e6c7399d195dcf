"""A pipeline's comparison report: how it is built from the children's evaluations,
and its columns and cell formatting (one definition for CLI, HTML and demo)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from textcls.labels import names_or_ids
from textcls.models import Dataset, Evaluation, Job, JobStatus, Model
from textcls.pipelines import BASELINE_STEP, pipeline_params, step_of

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


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows of a report: every variant, then the TF-IDF baseline (if fitted)."""
    rows = list(report.get("variants", []))
    if report.get("tfidf_baseline"):
        rows.append(report["tfidf_baseline"])
    return rows


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


# --------------------------------------------------------------------------- building


def _variant(model: Model, step: str, metrics: dict[str, Any]) -> dict[str, Any]:
    lat = metrics.get("latency_ms") or {}
    info = model.info or {}
    return {
        "step": step,
        "model_id": model.id,
        "format": model.format,
        "parent_id": model.parent_id,
        "layers": info.get("num_layers"),
        "heads": info.get("num_heads"),
        "ffn": info.get("ffn_size"),
        "hidden": info.get("hidden_size"),
        "size_bytes": model.size_bytes,
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "latency_p50_ms": lat.get("p50"),
        "latency_p99_ms": lat.get("p99"),
        "throughput_per_s": metrics.get("throughput_per_s"),
        "device": metrics.get("device"),
        "per_class": metrics.get("per_class"),
    }


def _label_names(s: Session, dataset_id: int) -> list[str]:
    ds = s.get(Dataset, dataset_id)
    return names_or_ids(ds.label_names, ds.num_labels) if ds is not None else []


def build_report(s: Session, parent: Job) -> dict[str, Any]:
    """Every variant of a pipeline side by side, with the budget decision."""
    params = pipeline_params(parent)
    children = list(s.exec(select(Job).where(Job.parent_id == parent.id).order_by(col(Job.id))))
    steps: dict[int, str] = {}
    if params.model_id is not None:
        steps[params.model_id] = "start"
    for c in children:
        if c.kind != "evaluate" and c.output_model_id is not None:
            steps[c.output_model_id] = step_of(c)
    variants: list[dict[str, Any]] = []
    for model_id, step in steps.items():
        model = s.get(Model, model_id)
        ev = s.exec(
            select(Evaluation)
            .where(Evaluation.model_id == model_id)
            .where(Evaluation.dataset_id == params.eval_dataset_id)
        ).first()
        if model is not None and ev is not None:
            variants.append(_variant(model, step, ev.metrics or {}))
    base = variants[0]["accuracy"] if variants else None
    excluded = "onnx-fp16" if params.target_device == "cpu" else "onnx-int8"
    for v in variants:
        acc = v["accuracy"]
        v["drop_points"] = (
            round((base - acc) * 100, 3) if base is not None and acc is not None else None
        )
        v["within_budget"] = (
            v["drop_points"] is not None and v["drop_points"] <= params.max_accuracy_drop + 1e-9
        )
        v["eligible"] = v["within_budget"] and v["format"] != excluded
        v["chosen"] = False
    eligible = [v for v in variants if v["eligible"] and v["latency_p50_ms"] is not None]
    chosen = min(
        eligible, key=lambda v: (v["latency_p50_ms"], -(v["throughput_per_s"] or 0)), default=None
    )
    if chosen is not None:
        chosen["chosen"] = True
    tfidf = _baseline_row(children)
    measured_on = sorted({str(v["device"]) for v in variants if v["device"]})
    return {
        "pipeline_job_id": parent.id,
        "eval_dataset_id": params.eval_dataset_id,
        # The class names every variant's per-class figures are keyed by.
        "label_names": _label_names(s, params.eval_dataset_id),
        "target_device": params.target_device,
        # Where the variants were timed; a gpu target timed on a CPU (no GPU
        # worker took the evaluations) gets a warning: the choice is a CPU one.
        "measured_on": measured_on,
        "device_warning": _device_warning(params.target_device, measured_on),
        "max_accuracy_drop": params.max_accuracy_drop,
        "baseline_accuracy": base,
        "selection": f"lowest batch-1 p50 latency among variants within the budget"
        f" ({excluded} excluded for target {params.target_device})",
        "chosen_model_id": chosen["model_id"] if chosen else None,
        "variants": variants,
        "tfidf_baseline": tfidf,
        "verdict": verdict(chosen, tfidf),
        "pretrain": _pretrain_row(children),
    }


def _pretrain_row(children: list[Job]) -> dict[str, Any] | None:
    """The optional pretrain step's MLM loss per epoch (its model is the train step's base)."""
    job = next(
        (c for c in children if c.kind == "pretrain" and c.status == JobStatus.succeeded), None
    )
    if job is None:
        return None
    m = job.metrics or {}
    return {
        "job_id": job.id,
        "model_id": job.output_model_id,
        "mlm_loss_per_epoch": [h.get("mlm_loss") for h in m.get("history", [])],
        "rows": m.get("rows"),
        "seconds": m.get("seconds"),
    }


def _device_warning(target: str, measured_on: list[str]) -> str | None:
    off = [d for d in measured_on if (d == "cpu") != (target == "cpu")]
    if not off:
        return None
    return (
        f"target {target}, but variants were timed on {', '.join(off)}: "
        "the chosen variant is the fastest there, not necessarily on the target"
    )


def _baseline_row(children: list[Job]) -> dict[str, Any] | None:
    """The TF-IDF + LR baseline child's figures, in the variants' columns."""
    job = next(
        (c for c in children if step_of(c) == BASELINE_STEP and c.status == JobStatus.succeeded),
        None,
    )
    if job is None:
        return None
    m = job.metrics or {}
    lat = m.get("latency_ms") or {}
    return {
        "step": "tfidf-lr baseline",
        "model_id": None,
        "format": "sklearn",
        "size_bytes": m.get("size_bytes"),
        "accuracy": m.get("accuracy"),
        "macro_f1": m.get("macro_f1"),
        "latency_p50_ms": lat.get("p50"),
        "latency_p99_ms": lat.get("p99"),
        "throughput_per_s": m.get("throughput_per_s"),
        "fit_seconds": m.get("fit_seconds"),
        "job_id": job.id,
    }


def verdict(chosen: dict[str, Any] | None, tfidf: dict[str, Any] | None) -> str | None:
    """One plain sentence: does the chosen variant beat the TF-IDF + LR baseline?"""
    if chosen is None or tfidf is None or chosen["accuracy"] is None or tfidf["accuracy"] is None:
        return None
    points = (chosen["accuracy"] - tfidf["accuracy"]) * 100
    base = (
        f"the TF-IDF + logistic-regression baseline ({tfidf['accuracy'] * 100:.2f}%, "
        f"fitted in {tfidf['fit_seconds'] or 0:.0f} s)"
    )
    if points < 0:
        return (
            f"BELOW BASELINE: the chosen variant (model {chosen['model_id']}, "
            f"{chosen['accuracy'] * 100:.2f}%) is {-points:.2f} points below {base}; "
            "the transformer does not earn its cost on this data"
        )
    return (
        f"the chosen variant (model {chosen['model_id']}, {chosen['accuracy'] * 100:.2f}%) "
        f"is {points:.2f} points above {base}"
    )


def pipeline_report(session: Session, job: Job) -> dict[str, Any]:
    """The report of a pipeline job as the API serves it: the comparison, status and steps.

    A succeeded pipeline's report is the one frozen into its metrics when it ended.
    """
    if job.status == JobStatus.succeeded and (job.metrics or {}).get("variants") is not None:
        report = dict(job.metrics)
    else:
        report = build_report(session, job)
    children = session.exec(select(Job).where(Job.parent_id == job.id).order_by(col(Job.id)))
    report["status"] = job.status
    report["error"] = job.error
    report["steps"] = [
        {
            "job_id": c.id,
            "step": step_of(c),
            "kind": c.kind,
            "status": c.status,
            "output_model_id": c.output_model_id,
            "error": c.error,
        }
        for c in children
    ]
    return report
