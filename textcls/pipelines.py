"""The ``pipeline`` job's plan: which child job comes next.

A pipeline parent does no work of its own; its children (train, prune,
distill, export, fp16, quantize, and an evaluate after each) do. Planning is a
pure function of the parent's params and its children so far, so advancing
twice (two workers, a redelivered message) chooses the same step; the
lifecycle (:mod:`textcls.lifecycle`) locks the parent while it submits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textcls.jobs import DEFAULT_QUEUE, TRAINING_KEYS, PipelineParams, user_params
from textcls.models import Job, JobStatus

# Which earlier step's model each step starts from (the newest of these present).
SOURCES: dict[str, tuple[str, ...]] = {
    "prune": ("train", "start"),
    "distill": ("prune", "train", "start"),
    "export": ("distill", "prune", "train", "start"),
    "fp16": ("export",),
    "quantize": ("export",),
}
PYTORCH_STEPS = ("train", "prune", "distill")
# Kinds that run on the target device of a target_device=gpu pipeline, so the
# variant is chosen by latencies measured there (and fp16 is fused for CUDA).
TARGET_KINDS = ("evaluate", "fp16")
# The key in a child's params that names its step (bookkeeping, never user input).
STEP_KEY = "_step"
BASELINE_STEP = "baseline"
PRETRAIN_STEP = "pretrain"


@dataclass
class Step:
    """One child to run: a job kind, its params, and what it is for."""

    name: str
    kind: str
    params: dict[str, Any]


def pipeline_params(parent: Job) -> PipelineParams:
    return PipelineParams.model_validate(user_params(parent.params))


def step_of(job: Job) -> str:
    """The step a pipeline child runs (its kind for a job outside a pipeline)."""
    return str((job.params or {}).get(STEP_KEY, job.kind))


def child_queue(step: Step, p: PipelineParams) -> str:
    """The queue of a child: the kind's default; for a gpu target, training,
    evaluation and fp16 on ``gpu``."""
    if p.target_device == "gpu" and step.kind in (*PYTORCH_STEPS, *TARGET_KINDS):
        return "gpu"
    return DEFAULT_QUEUE[step.kind]


def eval_device(p: PipelineParams) -> str:
    """The ``device`` of a pipeline's evaluations: the target's.

    A cpu target times on the CPU even on a worker with a GPU. A gpu target
    uses the pipeline's ``device`` when it names a CUDA device (then a worker
    without one fails the evaluation), else ``auto``: CUDA on a worker that has
    it, the CPU otherwise, and the evaluation records which
    (:func:`textcls.report.build_report` flags a gpu target timed on a CPU).
    """
    if p.target_device == "cpu":
        return "cpu"
    return p.device if p.device.startswith("cuda") else "auto"


def _training(p: PipelineParams) -> dict[str, Any]:
    out = {k: getattr(p, k) for k in TRAINING_KEYS}
    return {k: v for k, v in out.items() if v is not None}


def _model_step(name: str, p: PipelineParams, source: int | None) -> Step:
    """The job that produces step ``name``'s model from ``source``.

    For ``train``, ``source`` is the pretrain step's model, if there is one.
    """
    t = _training(p)
    if name == "pretrain":
        # MLM on the training sentences; the fine-tuning learning rate is not its.
        params = {
            "dataset_ids": [p.dataset_id],
            "base_model": p.base_model or "scratch:tiny",
            "vocab": p.vocab,
            "init_embeddings": p.init_embeddings,
            **{k: v for k, v in t.items() if k != "learning_rate"},
            "epochs": p.pretrain_epochs,
        }
        return Step("pretrain", "pretrain", params)
    if name == "train":
        # Checkpoints are chosen on a split of the training data, so the
        # evaluation set stays held out for the comparison.
        params = {
            "dataset_id": p.dataset_id,
            "base_model": p.base_model or "scratch:tiny",
            "vocab": p.vocab,
            "init_embeddings": p.init_embeddings,
            **t,
        }
        if p.baseline_weight is not None:
            params["baseline_weight"] = p.baseline_weight
        if source is not None:
            params["base_model_id"] = source
        return Step("train", "train", params)
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
        params = {
            "teacher_model_id": source,
            "dataset_id": p.dataset_id,
            "student_layers": p.student_layers,
            **t,
        }
        return Step("distill", "distill", params)
    if name in ("export", "fp16", "quantize"):
        return Step(name, name, {"model_id": source, "dataset_id": p.eval_dataset_id})
    raise ValueError(f"unknown step {name}")


def _steps(p: PipelineParams) -> list[str]:
    return [s for s in p.steps if s not in ("pretrain", "train") or p.model_id is None]


def expected_children(p: PipelineParams) -> int:
    """How many children the pipeline will have (a model step and an evaluate each;
    pretrain's masked-LM model has no evaluation)."""
    steps = _steps(p)
    return (
        2 * len(steps)
        - int(PRETRAIN_STEP in steps)
        + (1 if p.model_id is not None else 0)
        + int(p.baseline)
    )


def _baseline_step(p: PipelineParams) -> Step:
    params = {"dataset_id": p.dataset_id, "eval_dataset_id": p.eval_dataset_id, "seed": p.seed}
    return Step(BASELINE_STEP, "baseline", params)


def plan(p: PipelineParams, children: list[Job]) -> Step | None:
    """The next child to submit, or None when every step is done (or one still runs).

    Raises ValueError when a step has no model to start from.
    """
    produced: dict[str, int] = {}
    if p.model_id is not None:
        produced["start"] = p.model_id
    evaluated: set[int] = set()
    submitted: set[str] = set()
    for child in children:
        step = (child.params or {}).get(STEP_KEY)
        if not isinstance(step, str):
            continue
        submitted.add(step)
        if child.status == JobStatus.succeeded:
            if child.kind == "evaluate":
                evaluated.add(int(child.params["model_id"]))
            elif child.output_model_id is not None:
                produced[step] = child.output_model_id
    # Evaluate the starting model first, then each step's model right after it.
    for name in ["start", *_steps(p)]:
        if name == "start":
            if p.model_id is None:
                continue
            model_id: int = p.model_id
        else:
            if name not in produced:
                if name in submitted:
                    return None  # still running (or failed: the caller handles that)
                src = produced.get(PRETRAIN_STEP) if name == "train" else None
                if name not in ("train", PRETRAIN_STEP):
                    src = next((produced[s] for s in SOURCES[name] if s in produced), None)
                    if src is None:
                        raise ValueError(
                            f"step {name} has no model to start from; add train or give model_id"
                        )
                return _model_step(name, p, src)
            model_id = produced[name]
            if name == PRETRAIN_STEP:
                continue  # a masked LM: nothing to classify with
        eval_name = f"evaluate:{name}"
        if model_id not in evaluated:
            if eval_name in submitted:
                return None
            params = {
                "model_id": model_id,
                "dataset_id": p.eval_dataset_id,
                "device": eval_device(p),
            }
            return Step(eval_name, "evaluate", params)
    # Last, the yardstick: TF-IDF + logistic regression on the same rows.
    if p.baseline and BASELINE_STEP not in submitted:
        return _baseline_step(p)
    return None
