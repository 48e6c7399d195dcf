"""The ``pipeline`` job: the seed's recipe as a chain of child jobs.

The parent does no work of its own. Its handler plans the first step and
returns; each time a child reaches a final state, :func:`advance` looks at the
children so far and submits the next one (on that step's queue), or finishes
the parent: a failed or cancelled step stops the rest with its reason, and at
the end the fastest variant within the accuracy budget is named (and promoted
if asked). Every produced model is evaluated on the same evaluation set.

Planning is a pure function of the parent's params and its children, so
advancing twice (two workers, a redelivered message) submits nothing twice:
the parent row is locked while a step is chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from textcls.db import session_scope
from textcls.jobs import DEFAULT_QUEUE, PipelineParams
from textcls.models import (
    FINAL_STATUSES,
    Deployment,
    Evaluation,
    Job,
    JobStatus,
    Model,
    utcnow,
)

log = logging.getLogger(__name__)

TRAIN_KEYS = ("epochs", "batch_size", "learning_rate", "max_length", "seed")


@dataclass
class Step:
    """One child to run: a job kind, its params, and what it is for."""

    name: str
    kind: str
    params: dict[str, Any]


def _training(p: PipelineParams) -> dict[str, Any]:
    out = {k: getattr(p, k) for k in TRAIN_KEYS}
    return {k: v for k, v in out.items() if v is not None}


def _model_step(name: str, p: PipelineParams, source: int | None) -> Step | None:
    """The job that produces step ``name``'s model from ``source``."""
    t = _training(p)
    if name == "train":
        return Step(
            "train",
            "train",
            # Checkpoints are chosen on a split of the training data, so the
            # evaluation set stays held out for the comparison.
            {
                "dataset_id": p.dataset_id,
                "base_model": p.base_model or "scratch:tiny",
                **t,
            },
        )
    assert source is not None
    if name == "prune":
        # A short fine-tune after pruning recovers most of the loss.
        return Step(
            "prune",
            "prune",
            {
                "model_id": source,
                "dataset_id": p.dataset_id,
                "target_heads": p.target_heads,
                "target_ffn": p.target_ffn,
                **{**t, "epochs": max(1, p.epochs // 2)},
            },
        )
    if name == "distill":
        return Step(
            "distill",
            "distill",
            {
                "teacher_model_id": source,
                "dataset_id": p.dataset_id,
                "student_layers": p.student_layers,
                **t,
            },
        )
    if name == "export":
        return Step("export", "export", {"model_id": source, "dataset_id": p.eval_dataset_id})
    if name == "fp16":
        return Step("fp16", "fp16", {"model_id": source, "dataset_id": p.eval_dataset_id})
    if name == "quantize":
        return Step("quantize", "quantize", {"model_id": source, "dataset_id": p.eval_dataset_id})
    raise ValueError(f"unknown step {name}")


# Which earlier step's model each step starts from (the newest of these present).
SOURCES: dict[str, tuple[str, ...]] = {
    "prune": ("train", "start"),
    "distill": ("prune", "train", "start"),
    "export": ("distill", "prune", "train", "start"),
    "fp16": ("export",),
    "quantize": ("export",),
}
PYTORCH_STEPS = ("train", "prune", "distill")


def plan(p: PipelineParams, children: list[Job]) -> Step | None:
    """The next child to submit, or None when every step is done."""
    steps = [s for s in p.steps if s != "train" or p.model_id is None]
    produced: dict[str, int] = {}
    if p.model_id is not None:
        produced["start"] = p.model_id
    evaluated: set[int] = set()
    submitted: set[str] = set()
    for child in children:
        step = (child.params or {}).get("_step")
        if not isinstance(step, str):
            continue
        submitted.add(step)
        if child.status == JobStatus.succeeded:
            if child.kind == "evaluate":
                evaluated.add(int(child.params["model_id"]))
            elif child.output_model_id is not None:
                produced[step] = child.output_model_id
    # Evaluate the starting model first, then each step's model right after it.
    order = ["start", *steps]
    for name in order:
        if name == "start":
            if p.model_id is None:
                continue
            model_id: int | None = p.model_id
        else:
            if name not in produced:
                if name in submitted:
                    return None  # still running (or failed: the caller handles that)
                src = None
                if name != "train":
                    src = next((produced[s] for s in SOURCES[name] if s in produced), None)
                    if src is None:
                        raise ValueError(
                            f"step {name} has no model to start from; add train or give model_id"
                        )
                return _model_step(name, p, src)
            model_id = produced[name]
        eval_name = f"evaluate:{name}"
        if model_id not in evaluated:
            if eval_name in submitted:
                return None
            return Step(
                eval_name, "evaluate", {"model_id": model_id, "dataset_id": p.eval_dataset_id}
            )
    return None


def _submit_child(session: Session, parent: Job, step: Step) -> Job:
    from workers.celery_app import send_job

    params = {**step.params, "_step": step.name}
    queue = DEFAULT_QUEUE[step.kind]
    if step.kind in PYTORCH_STEPS and (parent.params or {}).get("target_device") == "gpu":
        queue = "gpu"
    child = Job(kind=step.kind, params=params, queue=queue, parent_id=parent.id)
    session.add(child)
    session.flush()
    assert child.id is not None
    parent.stage = f"{step.name} (job {child.id})"
    parent.updated_at = utcnow()
    session.add(parent)
    session.commit()
    child.task_id = send_job(child.id, child.attempt, queue)
    session.add(child)
    session.commit()
    log.info("pipeline %s: submitted %s as job %s", parent.id, step.name, child.id)
    return child


def _lock_parent(session: Session, parent_id: int) -> Job | None:
    stmt = select(Job).where(Job.id == parent_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.exec(stmt).first()


def advance(parent_id: int) -> None:
    """Move a pipeline on after one of its children changed; safe to call any time."""
    with session_scope() as s:
        parent = _lock_parent(s, parent_id)
        if parent is None or parent.kind != "pipeline" or parent.status != JobStatus.running:
            return
        params = PipelineParams.model_validate(
            {k: v for k, v in (parent.params or {}).items() if not k.startswith("_")}
        )
        children = list(s.exec(select(Job).where(Job.parent_id == parent_id).order_by(col(Job.id))))
        bad = next(
            (c for c in children if c.status in (JobStatus.failed, JobStatus.cancelled)), None
        )
        if bad is not None:
            step = (bad.params or {}).get("_step", bad.kind)
            _finish(
                s,
                parent,
                JobStatus.failed if bad.status == JobStatus.failed else JobStatus.cancelled,
                error=f"step {step} (job {bad.id}) {bad.status}: {bad.error or ''}".strip(),
            )
            return
        if any(c.status not in FINAL_STATUSES for c in children):
            return
        try:
            step = plan(params, children)
        except ValueError as exc:
            _finish(s, parent, JobStatus.failed, error=str(exc))
            return
        total = _expected_children(params)
        parent.progress = min(0.99, len(children) / max(1, total))
        if step is not None:
            try:
                _submit_child(s, parent, step)
            except Exception as exc:
                s.rollback()
                parent = _lock_parent(s, parent_id)
                if parent is not None:
                    _finish(
                        s, parent, JobStatus.failed, error=f"could not submit {step.name}: {exc}"
                    )
            return
        report = build_report(s, parent)
        parent.metrics = report
        chosen = report.get("chosen_model_id")
        if chosen is None:
            _finish(s, parent, JobStatus.failed, error="no variant was evaluated")
            return
        parent.output_model_id = chosen
        if params.promote:
            from textcls.deployments import publish_deployment

            dep = Deployment(model_id=chosen, action="promote")
            s.add(dep)
            s.flush()
            parent.metrics = {**report, "promoted_deployment_id": dep.id}
            _finish(s, parent, JobStatus.succeeded)
            try:
                publish_deployment(dep)
            except Exception:  # workers also poll the database
                log.warning("could not publish deployment %s", dep.id, exc_info=True)
            return
        _finish(s, parent, JobStatus.succeeded)


def _expected_children(p: PipelineParams) -> int:
    steps = [s for s in p.steps if s != "train" or p.model_id is None]
    return 2 * len(steps) + (1 if p.model_id is not None else 0)


def _finish(s: Session, parent: Job, status: JobStatus, error: str | None = None) -> None:
    now = utcnow()
    parent.status = status
    parent.error = error
    parent.finished_at = now
    parent.updated_at = now
    parent.stage = "done" if status == JobStatus.succeeded else str(status)
    if status == JobStatus.succeeded:
        parent.progress = 1.0
    s.add(parent)
    s.commit()
    log.info("pipeline %s %s%s", parent.id, status, f": {error}" if error else "")


def start(parent_id: int) -> None:
    """Called by the pipeline handler once the parent is running."""
    advance(parent_id)


# --------------------------------------------------------------------------- report


def build_report(s: Session, parent: Job) -> dict[str, Any]:
    """Every variant of a pipeline side by side, with the budget decision."""
    params = PipelineParams.model_validate(
        {k: v for k, v in (parent.params or {}).items() if not k.startswith("_")}
    )
    children = list(s.exec(select(Job).where(Job.parent_id == parent.id).order_by(col(Job.id))))
    step_of: dict[int, str] = {}
    if params.model_id is not None:
        step_of[params.model_id] = "start"
    for c in children:
        if c.kind != "evaluate" and c.output_model_id is not None:
            step_of[c.output_model_id] = str((c.params or {}).get("_step", c.kind))
    variants: list[dict[str, Any]] = []
    for model_id, step in step_of.items():
        model = s.get(Model, model_id)
        ev = s.exec(
            select(Evaluation)
            .where(Evaluation.model_id == model_id)
            .where(Evaluation.dataset_id == params.eval_dataset_id)
        ).first()
        if model is None or ev is None:
            continue
        m = ev.metrics or {}
        lat = m.get("latency_ms") or {}
        info = model.info or {}
        variants.append(
            {
                "step": step,
                "model_id": model_id,
                "format": model.format,
                "parent_id": model.parent_id,
                "layers": info.get("num_layers"),
                "heads": info.get("num_heads"),
                "ffn": info.get("ffn_size"),
                "hidden": info.get("hidden_size"),
                "size_bytes": model.size_bytes,
                "accuracy": m.get("accuracy"),
                "macro_f1": m.get("macro_f1"),
                "latency_p50_ms": lat.get("p50"),
                "latency_p99_ms": lat.get("p99"),
                "throughput_per_s": m.get("throughput_per_s"),
                "device": m.get("device"),
            }
        )
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
    return {
        "pipeline_job_id": parent.id,
        "eval_dataset_id": params.eval_dataset_id,
        "target_device": params.target_device,
        "max_accuracy_drop": params.max_accuracy_drop,
        "baseline_accuracy": base,
        "selection": f"lowest batch-1 p50 latency among variants within the budget"
        f" ({excluded} excluded for target {params.target_device})",
        "chosen_model_id": chosen["model_id"] if chosen else None,
        "variants": variants,
    }


def child_finished(job_id: int) -> None:
    """Hook run after any job ends: advance its pipeline, if it has one."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        parent_id = job.parent_id if job is not None else None
    if parent_id is not None:
        try:
            advance(parent_id)
        except Exception:
            log.exception("advancing pipeline %s failed", parent_id)
            with session_scope() as s:
                s.exec(
                    update(Job)
                    .where(col(Job.id) == parent_id)
                    .where(col(Job.status) == JobStatus.running)
                    .values(
                        status=JobStatus.failed,
                        finished_at=utcnow(),
                        error="internal error while advancing the pipeline",
                    )
                )
                s.commit()
