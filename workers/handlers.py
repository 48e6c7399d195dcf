"""One handler per job kind: resolve inputs, call a pipeline step, describe outputs.

Pipeline modules are imported inside the handlers so the worker process loads
torch and friends only when it first needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from sqlmodel import Session, select

from pipeline.common import StepError
from textcls import lifecycle
from textcls.jobs import (
    TRAINING_KEYS,
    DistillParams,
    EvaluateParams,
    ExportParams,
    Fp16Params,
    PruneParams,
    QuantizeParams,
    TrainingParams,
    TrainParams,
)
from textcls.models import Evaluation, Job, Model, ModelFormat, utcnow
from workers.runner import JobContext, NewModel, Outcome, handler

log = logging.getLogger(__name__)

CHECK_TEXTS = 64


def _model_of_format(ctx: JobContext, model_id: int, allowed: str, kind: str) -> tuple[Model, Path]:
    """The source model of a step that takes one format, and its folder."""
    model, folder = ctx.model(model_id)
    if model.format != allowed:
        raise StepError(
            f"{kind} needs a model of format {allowed}; model {model.id} is {model.format}"
        )
    return model, folder


def _check_texts(ctx: JobContext, dataset_id: int | None) -> list[str] | None:
    if dataset_id is None:
        return None
    from pipeline.data import read_tsv

    _, path = ctx.dataset(dataset_id)
    return read_tsv(path).texts[:CHECK_TEXTS]


def _check_labels(model: Model, dataset_num_labels: int, dataset_id: int) -> None:
    if dataset_num_labels > model.num_labels:
        raise StepError(
            f"dataset {dataset_id} has labels up to {dataset_num_labels - 1} but model "
            f"{model.id} has {model.num_labels} labels"
        )


def _arch_info(folder: Path) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "num_heads": cfg.get("num_attention_heads"),
        "ffn_size": cfg.get("intermediate_size"),
    }


def _derived(
    ctx: JobContext, result: Any, source: Model, fmt: str, prefix: str, info: dict[str, Any]
) -> Outcome:
    """The outcome of a step that turns ``source`` into a new model of ``fmt``."""
    return Outcome(
        metrics=result.metrics,
        model=NewModel(
            folder=result.model_dir,
            format=fmt,
            num_labels=source.num_labels,
            name=f"{prefix}-{ctx.job_id}",
            parent_id=source.id,
            info=info,
        ),
    )


def _training_kwargs(ctx: JobContext, p: TrainingParams) -> dict[str, Any]:
    """The common training parameters, as every training-like step takes them."""
    return {**{k: getattr(p, k) for k in TRAINING_KEYS}, "progress": ctx.progress}


def _pytorch_input(
    ctx: JobContext, model_id: int, dataset_id: int, kind: str
) -> tuple[Model, Path, Path]:
    """A pytorch source model and a dataset whose labels it covers."""
    model, model_dir = _model_of_format(ctx, model_id, ModelFormat.pytorch, kind)
    ds, data_path = ctx.dataset(dataset_id)
    _check_labels(model, ds.num_labels, dataset_id)
    return model, model_dir, data_path


@handler("train")
def run_train(ctx: JobContext) -> Outcome:
    from pipeline.train import train

    p = cast(TrainParams, ctx.params)
    _, train_path = ctx.dataset(p.dataset_id)
    eval_path = ctx.dataset(p.eval_dataset_id)[1] if p.eval_dataset_id is not None else None
    result = train(
        train_path,
        ctx.out_dir(),
        eval_tsv=eval_path,
        base_model=p.base_model,
        **_training_kwargs(ctx, p),
    )
    info = {
        **_arch_info(result.model_dir),
        "base_model": p.base_model,
        "dataset_id": p.dataset_id,
        "max_length": p.max_length,
    }
    return Outcome(
        metrics=result.metrics,
        model=NewModel(
            folder=result.model_dir,
            format=ModelFormat.pytorch,
            num_labels=result.num_labels,
            name=f"train-{ctx.job_id}",
            info=info,
        ),
    )


@handler("prune")
def run_prune(ctx: JobContext) -> Outcome:
    from pipeline.prune import prune

    p = cast(PruneParams, ctx.params)
    model, model_dir, data_path = _pytorch_input(ctx, p.model_id, p.dataset_id, "prune")
    result = prune(
        model_dir,
        data_path,
        ctx.out_dir(),
        target_heads=p.target_heads,
        target_ffn=p.target_ffn,
        **_training_kwargs(ctx, p),
    )
    return _derived(
        ctx,
        result,
        model,
        ModelFormat.pytorch,
        "prune",
        {**_arch_info(result.model_dir), "pruned_from": model.id},
    )


@handler("distill")
def run_distill(ctx: JobContext) -> Outcome:
    from pipeline.distill import distill

    p = cast(DistillParams, ctx.params)
    teacher, teacher_dir, data_path = _pytorch_input(
        ctx, p.teacher_model_id, p.dataset_id, "distill"
    )
    eval_path = ctx.dataset(p.eval_dataset_id)[1] if p.eval_dataset_id is not None else None
    result = distill(
        teacher_dir,
        data_path,
        ctx.out_dir(),
        eval_tsv=eval_path,
        student_layers=p.student_layers,
        student_model_dir=Path(p.student_model_dir) if p.student_model_dir else None,
        temperature=p.temperature,
        hidden_match=p.hidden_match,
        **_training_kwargs(ctx, p),
    )
    return _derived(
        ctx,
        result,
        teacher,
        ModelFormat.pytorch,
        "distill",
        {**_arch_info(result.model_dir), "teacher_id": teacher.id},
    )


@handler("export")
def run_export(ctx: JobContext) -> Outcome:
    from pipeline.export import export_onnx

    p = cast(ExportParams, ctx.params)
    model, model_dir = _model_of_format(ctx, p.model_id, ModelFormat.pytorch, "export")
    result = export_onnx(
        model_dir,
        ctx.out_dir(),
        check_texts=_check_texts(ctx, p.dataset_id),
        opset=p.opset,
        atol=p.atol,
        progress=ctx.progress,
    )
    return _derived(ctx, result, model, ModelFormat.onnx, "onnx", {**model.info, "opset": p.opset})


@handler("fp16")
def run_fp16(ctx: JobContext) -> Outcome:
    from pipeline.optimize import to_fp16

    p = cast(Fp16Params, ctx.params)
    model, model_dir = _model_of_format(ctx, p.model_id, ModelFormat.onnx, "fp16")
    result = to_fp16(
        model_dir,
        ctx.out_dir(),
        use_gpu=p.use_gpu,
        check_texts=_check_texts(ctx, p.dataset_id),
        progress=ctx.progress,
    )
    return _derived(ctx, result, model, ModelFormat.onnx_fp16, "fp16", dict(model.info))


@handler("quantize")
def run_quantize(ctx: JobContext) -> Outcome:
    from pipeline.quantize import quantize_int8

    p = cast(QuantizeParams, ctx.params)
    model, model_dir = _model_of_format(ctx, p.model_id, ModelFormat.onnx, "quantize")
    result = quantize_int8(
        model_dir,
        ctx.out_dir(),
        per_channel=p.per_channel,
        check_texts=_check_texts(ctx, p.dataset_id),
        progress=ctx.progress,
    )
    return _derived(
        ctx,
        result,
        model,
        ModelFormat.onnx_int8,
        "int8",
        {**model.info, "per_channel": p.per_channel},
    )


@handler("evaluate")
def run_evaluate(ctx: JobContext) -> Outcome:
    from pipeline.evaluate import evaluate

    p = cast(EvaluateParams, ctx.params)
    model, model_dir = ctx.model(p.model_id)
    ds, data_path = ctx.dataset(p.dataset_id)
    _check_labels(model, ds.num_labels, p.dataset_id)
    metrics = evaluate(
        model_dir,
        data_path,
        batch_size=p.batch_size,
        latency_runs=p.latency_runs,
        progress=ctx.progress,
        threads=ctx.threads,
    )

    def record(session: Session, job: Job, _model: Model | None) -> None:
        # One evaluation per (model, dataset): a new run replaces the old one.
        row = session.exec(
            select(Evaluation)
            .where(Evaluation.model_id == p.model_id)
            .where(Evaluation.dataset_id == p.dataset_id)
        ).first()
        if row is None:
            row = Evaluation(model_id=p.model_id, dataset_id=p.dataset_id)
        row.job_id = job.id
        row.metrics = metrics
        row.created_at = utcnow()
        session.add(row)

    return Outcome(metrics=metrics, on_success=record)


@handler("pipeline")
def run_pipeline(ctx: JobContext) -> Outcome:
    """Plan and submit the first step; the children drive the rest."""
    lifecycle.advance(ctx.job_id)
    return Outcome(detach=True)
