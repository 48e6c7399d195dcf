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
    BaselineParams,
    DistillParams,
    EvaluateParams,
    ExportParams,
    Fp16Params,
    PredictParams,
    PretrainParams,
    PruneParams,
    QuantizeParams,
    TrainingParams,
    TrainParams,
)
from textcls.labels import label_set_problem
from textcls.models import Dataset, Evaluation, Job, Model, ModelFormat, utcnow
from workers.runner import JobContext, NewModel, Outcome, handler

log = logging.getLogger(__name__)

CHECK_TEXTS = 64


def _model_of_format(
    ctx: JobContext, model_id: int, allowed: str, kind: str, *, masked_lm: bool = False
) -> tuple[Model, Path]:
    """The source model of a step that takes one format, and its folder.

    A masked-LM model (a pretrain job's, 0 labels) is refused unless
    ``masked_lm``: only train and pretrain can start from one.
    """
    model, folder = ctx.model(model_id)
    if model.format != allowed:
        raise StepError(
            f"{kind} needs a model of format {allowed}; model {model.id} is {model.format}"
        )
    if not masked_lm and model.num_labels == 0:
        raise StepError(
            f"model {model.id} is a masked language model (a pretrain output, no classifier): "
            f"{kind} needs a classifier; train one on it first (train base_model_id={model.id})"
        )
    return model, folder


def _check_texts(ctx: JobContext, dataset_id: int | None) -> list[str] | None:
    if dataset_id is None:
        return None
    from pipeline.data import read_tsv

    _, path = ctx.dataset(dataset_id)
    return read_tsv(path).texts[:CHECK_TEXTS]


def _check_labels(model: Model, dataset: Dataset) -> None:
    """The API refused a mismatch already; the rows may have changed since."""
    problem = label_set_problem(model, dataset)
    if problem:
        raise StepError(problem)


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
            label_names=source.label_names,
        ),
    )


def _training_kwargs(p: TrainingParams) -> dict[str, Any]:
    """The common training parameters, as every training-like step takes them."""
    return {k: getattr(p, k) for k in TRAINING_KEYS}


# The training steps, run by :func:`_training_step` in a killable child process.
TRAINING_STEPS = {
    "train": "pipeline.train:train",
    "pretrain": "pipeline.pretrain:pretrain",
    "prune": "pipeline.prune:prune",
    "distill": "pipeline.distill:distill",
}


def _training_step(step: str, /, *args: Any, **kwargs: Any) -> Any:
    """Run training step ``step`` (in the child); its result without the in-memory model.

    A training step runs in a child process (:meth:`JobContext.run_killable`)
    because one optimizer step of a bert-base model takes 30-45 s on this
    2-core machine's CPU: a cancel checked between steps would wait that long,
    while the child is killed at once. The model stays behind: the result's
    folder holds it, and it would not cross the pipe cheaply.
    """
    import dataclasses
    import importlib

    module, name = TRAINING_STEPS[step].split(":")
    result = getattr(importlib.import_module(module), name)(*args, **kwargs)
    return dataclasses.replace(result, model=None, tokenizer=None)


def _require_device(device: str) -> None:
    """Fail a job at its start when this worker lacks the device it asks for.

    The API checks the syntax only; the message names the device and what this
    worker has (``torch.cuda.is_available()``, ``device_count``).
    """
    from pipeline.device import resolve_device

    resolve_device(device)


def _pytorch_input(
    ctx: JobContext, model_id: int, dataset_id: int, kind: str
) -> tuple[Model, Path, Path]:
    """A pytorch source model and a dataset whose labels it covers."""
    model, model_dir = _model_of_format(ctx, model_id, ModelFormat.pytorch, kind)
    ds, data_path = ctx.dataset(dataset_id)
    _check_labels(model, ds)
    return model, model_dir, data_path


def _base_model(
    ctx: JobContext, base_model: str, base_model_id: int | None, kind: str
) -> tuple[str, int | None]:
    """What a training step starts from: ``base_model``, or a registered model's folder.

    Returns the step's ``base_model`` argument and the new model's parent id.
    """
    if base_model_id is None:
        return base_model, None
    base, folder = _model_of_format(ctx, base_model_id, ModelFormat.pytorch, kind, masked_lm=True)
    return str(folder), base.id


@handler("train")
def run_train(ctx: JobContext) -> Outcome:
    p = cast(TrainParams, ctx.params)
    _require_device(p.device)
    train_ds, train_path = ctx.dataset(p.dataset_id)
    eval_path = ctx.dataset(p.eval_dataset_id)[1] if p.eval_dataset_id is not None else None
    base_model, parent_id = _base_model(ctx, p.base_model, p.base_model_id, "train")
    result = ctx.run_killable(
        _training_step,
        "train",
        train_path,
        ctx.out_dir(),
        eval_tsv=eval_path,
        base_model=base_model,
        vocab=p.vocab,
        init_embeddings=p.init_embeddings,
        label_names=train_ds.label_names,
        checkpoint=ctx.checkpointer(),
        baseline_weight=p.baseline_weight,
        **_training_kwargs(p),
    )
    info = {
        **_arch_info(result.model_dir),
        "base_model": p.base_model if parent_id is None else f"model {parent_id}",
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
            parent_id=parent_id,
            info=info,
            label_names=train_ds.label_names,
        ),
    )


@handler("pretrain")
def run_pretrain(ctx: JobContext) -> Outcome:
    p = cast(PretrainParams, ctx.params)
    _require_device(p.device)
    corpus = [ctx.dataset(i)[1] for i in p.dataset_ids]
    base_model, parent_id = _base_model(ctx, p.base_model, p.base_model_id, "pretrain")
    result = ctx.run_killable(
        _training_step,
        "pretrain",
        corpus,
        ctx.out_dir(),
        base_model=base_model,
        vocab=p.vocab,
        init_embeddings=p.init_embeddings,
        mask_prob=p.mask_prob,
        checkpoint=ctx.checkpointer(),
        **_training_kwargs(p),
    )
    info = {
        **_arch_info(result.model_dir),
        "task": "masked-lm",
        "base_model": p.base_model if parent_id is None else f"model {parent_id}",
        "dataset_ids": p.dataset_ids,
        "max_length": p.max_length,
    }
    return Outcome(
        metrics=result.metrics,
        model=NewModel(
            folder=result.model_dir,
            format=ModelFormat.pytorch,
            num_labels=0,
            name=f"pretrain-{ctx.job_id}",
            parent_id=parent_id,
            info=info,
        ),
    )


@handler("prune")
def run_prune(ctx: JobContext) -> Outcome:
    p = cast(PruneParams, ctx.params)
    _require_device(p.device)
    model, model_dir, data_path = _pytorch_input(ctx, p.model_id, p.dataset_id, "prune")
    result = ctx.run_killable(
        _training_step,
        "prune",
        model_dir,
        data_path,
        ctx.out_dir(),
        target_heads=p.target_heads,
        target_ffn=p.target_ffn,
        **_training_kwargs(p),
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
    p = cast(DistillParams, ctx.params)
    _require_device(p.device)
    teacher, teacher_dir, data_path = _pytorch_input(
        ctx, p.teacher_model_id, p.dataset_id, "distill"
    )
    eval_path = ctx.dataset(p.eval_dataset_id)[1] if p.eval_dataset_id is not None else None
    result = ctx.run_killable(
        _training_step,
        "distill",
        teacher_dir,
        data_path,
        ctx.out_dir(),
        eval_tsv=eval_path,
        student_layers=p.student_layers,
        student_model_dir=Path(p.student_model_dir) if p.student_model_dir else None,
        temperature=p.temperature,
        hidden_match=p.hidden_match,
        checkpoint=ctx.checkpointer(),
        **_training_kwargs(p),
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
    result = ctx.run_killable(
        export_onnx,
        model_dir,
        ctx.out_dir(),
        check_texts=_check_texts(ctx, p.dataset_id),
        opset=p.opset,
        atol=p.atol,
    )
    return _derived(ctx, result, model, ModelFormat.onnx, "onnx", {**model.info, "opset": p.opset})


@handler("fp16")
def run_fp16(ctx: JobContext) -> Outcome:
    from pipeline.optimize import to_fp16

    p = cast(Fp16Params, ctx.params)
    model, model_dir = _model_of_format(ctx, p.model_id, ModelFormat.onnx, "fp16")
    result = ctx.run_killable(
        to_fp16,
        model_dir,
        ctx.out_dir(),
        use_gpu=p.use_gpu,
        check_texts=_check_texts(ctx, p.dataset_id),
    )
    return _derived(ctx, result, model, ModelFormat.onnx_fp16, "fp16", dict(model.info))


@handler("quantize")
def run_quantize(ctx: JobContext) -> Outcome:
    from pipeline.quantize import quantize_int8

    p = cast(QuantizeParams, ctx.params)
    model, model_dir = _model_of_format(ctx, p.model_id, ModelFormat.onnx, "quantize")
    result = ctx.run_killable(
        quantize_int8,
        model_dir,
        ctx.out_dir(),
        per_channel=p.per_channel,
        check_texts=_check_texts(ctx, p.dataset_id),
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
    if model.num_labels == 0:
        raise StepError(f"model {model.id} is a masked language model: nothing to evaluate")
    if model.format == ModelFormat.pytorch:
        _require_device(p.device)  # ONNX models: load_predictor checks the CUDA provider
    ds, data_path = ctx.dataset(p.dataset_id)
    _check_labels(model, ds)
    metrics = ctx.run_killable(
        evaluate,
        model_dir,
        data_path,
        batch_size=p.batch_size,
        latency_runs=p.latency_runs,
        device=p.device,
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


@handler("baseline")
def run_tfidf_baseline(ctx: JobContext) -> Outcome:
    """Fit and score the TF-IDF + logistic-regression yardstick (nothing registered)."""
    from pipeline.baseline import run_baseline

    p = cast(BaselineParams, ctx.params)
    _, train_path = ctx.dataset(p.dataset_id)
    _, eval_path = ctx.dataset(p.eval_dataset_id)
    return Outcome(metrics=run_baseline(train_path, eval_path, seed=p.seed, progress=ctx.progress))


@handler("predict")
def run_predict(ctx: JobContext) -> Outcome:
    """Score a dataset (labels, if any, ignored) into ``predictions/<job id>.tsv``."""
    from pipeline.predict import predict

    p = cast(PredictParams, ctx.params)
    _, model_dir = ctx.model(p.model_id)
    _, data_path = ctx.dataset(p.dataset_id)
    staged = ctx.out_dir("predictions") / "predictions.tsv"
    metrics = predict(
        model_dir,
        data_path,
        staged,
        batch_size=p.batch_size,
        progress=ctx.progress,
        threads=ctx.threads,
    )
    relpath = ctx.store.predictions_relpath(ctx.job_id)

    def place(_session: Session, _job: Job, _model: Model | None) -> None:
        # Renamed into place inside the final transaction: a retry replaces it.
        ctx.store.commit(staged, relpath)

    return Outcome(metrics={**metrics, "predictions_path": relpath}, on_success=place)


@handler("pipeline")
def run_pipeline(ctx: JobContext) -> Outcome:
    """Plan and submit the first step; the children drive the rest."""
    lifecycle.advance(ctx.job_id)
    return Outcome(detach=True)
