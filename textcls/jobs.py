"""Job kinds: their parameter schemas and default queues.

One place for both the API (validation before anything is stored) and the
workers (typed parameters). Unknown parameters are errors (``extra=forbid``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(
        default=None, pattern=QUEUE_NAME_PATTERN, description="override the kind's queue"
    )


class TrainingParams(JobParams):
    epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=1024)
    learning_rate: float | None = Field(
        default=None, gt=0, lt=1, description="default: 5e-5 pretrained, 1e-3 from scratch"
    )
    max_length: int = Field(default=128, ge=8, le=512)
    seed: int = 42


class TrainParams(TrainingParams):
    dataset_id: int
    eval_dataset_id: int | None = None
    base_model: str = Field(
        default="scratch:tiny",
        min_length=1,
        max_length=500,
        description="local model folder, hub id, or scratch:tiny / scratch:small / scratch:base",
    )


class PruneParams(TrainingParams):
    model_id: int
    dataset_id: int
    target_heads: int = Field(default=8, ge=1, le=64)
    target_ffn: int = Field(default=2048, ge=1, le=16384)
    epochs: int = Field(default=0, ge=0, le=100, description="fine-tuning epochs after pruning")


class DistillParams(TrainingParams):
    teacher_model_id: int
    dataset_id: int
    eval_dataset_id: int | None = None
    student_layers: int = Field(default=3, ge=1, le=48)
    student_model_dir: str | None = Field(default=None, max_length=500)
    temperature: float = Field(default=4.0, gt=0, le=100)
    hidden_match: bool = True
    epochs: int = Field(default=5, ge=1, le=100)


class ExportParams(JobParams):
    model_id: int
    dataset_id: int | None = Field(default=None, description="sentences to check against PyTorch")
    opset: int = Field(default=17, ge=13, le=21)
    atol: float = Field(default=1e-3, gt=0, le=1)


class Fp16Params(JobParams):
    model_id: int
    dataset_id: int | None = None
    use_gpu: bool | None = Field(default=None, description="default: CUDA where present")


class QuantizeParams(JobParams):
    model_id: int
    dataset_id: int | None = None
    per_channel: bool = False


class EvaluateParams(JobParams):
    model_id: int
    dataset_id: int
    batch_size: int = Field(default=32, ge=1, le=1024)
    latency_runs: int = Field(default=100, ge=5, le=10000)


PIPELINE_STEPS = ("train", "prune", "distill", "export", "fp16", "quantize")


class PipelineParams(TrainingParams):
    dataset_id: int
    eval_dataset_id: int
    base_model: str | None = Field(default=None, max_length=500)
    model_id: int | None = None
    steps: list[str] = Field(default_factory=lambda: list(PIPELINE_STEPS))
    max_accuracy_drop: float = Field(default=1.0, ge=0, le=100)
    target_device: Literal["cpu", "gpu"] = "cpu"
    promote: bool = False
    target_heads: int = Field(default=8, ge=1, le=64)
    target_ffn: int = Field(default=2048, ge=1, le=16384)
    student_layers: int = Field(default=3, ge=1, le=48)

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[str]) -> list[str]:
        unknown = [s for s in steps if s not in PIPELINE_STEPS]
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {list(PIPELINE_STEPS)}")
        if not steps:
            raise ValueError("steps must not be empty")
        return steps


KIND_PARAMS: dict[str, type[JobParams]] = {
    "train": TrainParams,
    "prune": PruneParams,
    "distill": DistillParams,
    "export": ExportParams,
    "fp16": Fp16Params,
    "quantize": QuantizeParams,
    "evaluate": EvaluateParams,
    "pipeline": PipelineParams,
}

# Training-like work goes to the gpu queue; conversion, evaluation and
# orchestration to the cpu queue.
DEFAULT_QUEUE: dict[str, str] = {
    "train": "gpu",
    "prune": "gpu",
    "distill": "gpu",
    "export": "cpu",
    "fp16": "cpu",
    "quantize": "cpu",
    "evaluate": "cpu",
    "pipeline": "cpu",
}

# Parameters naming other records, for existence checks: field -> table.
DATASET_FIELDS = ("dataset_id", "eval_dataset_id")
MODEL_FIELDS = ("model_id", "teacher_model_id")


def parse_params(kind: str, params: dict[str, object]) -> JobParams:
    """Validate ``params`` for ``kind``; raises KeyError or pydantic.ValidationError."""
    return KIND_PARAMS[kind].model_validate(params)


def queue_for(kind: str, params: JobParams) -> str:
    return params.queue or DEFAULT_QUEUE[kind]
