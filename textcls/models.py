"""Database models (SQLModel): datasets, jobs, models, evaluations, deployments.

Layering follows the usual SQLModel pattern: ``XBase`` holds shared fields,
``X(table=True)`` is the row, ``XPublic`` is what the API returns.
Timestamps are timezone-aware UTC (SQLModel's ``UTCDateTime`` keeps them so on
SQLite too).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC now; every timestamp in the database uses this."""
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# Plain strings, so rows, enum members and JSON from the API all test against it.
FINAL_STATUSES: frozenset[str] = frozenset(
    {JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value}
)

# Ids (and offsets) fit the schema's 32-bit INTEGER columns: a larger number
# names nothing, and the databases would fail on it (a 500) instead of a 404.
MAX_ID = 2**31 - 1


class ModelFormat(enum.StrEnum):
    pytorch = "pytorch"
    onnx = "onnx"
    onnx_fp16 = "onnx-fp16"
    onnx_int8 = "onnx-int8"


# --------------------------------------------------------------------------- datasets


class DatasetBase(SQLModel):
    name: str = Field(max_length=200)
    rows: int
    num_labels: int
    label_counts: dict[str, int] = Field(
        default_factory=dict,
        sa_column=Column(JSON),
        description="rows per class, keyed by class name (an unnamed class: its id)",
    )
    # The name of each class id (None: the labels are plain ids); see pipeline.data.
    label_names: list[str] | None = Field(default=None, sa_column=Column(JSON))
    labelled: bool = Field(default=True, description="false: sentences only, no labels")
    sha256: str = Field(max_length=64, description="of the file as uploaded")
    size_bytes: int


class Dataset(DatasetBase, table=True):
    __tablename__ = "datasets"
    id: int | None = Field(default=None, primary_key=True)
    path: str = Field(description="file path relative to the artifact folder")
    created_at: datetime = Field(default_factory=utcnow)


class DatasetPublic(DatasetBase):
    id: int
    created_at: datetime


# --------------------------------------------------------------------------- jobs


class JobBase(SQLModel):
    kind: str = Field(max_length=32, index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class JobCreate(SQLModel):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class Job(JobBase, table=True):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),)

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(default=JobStatus.queued, max_length=16, index=True)
    queue: str = Field(default="cpu", max_length=64)
    progress: float = 0.0
    stage: str | None = Field(default=None, max_length=200)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text))
    # No foreign key: jobs and models reference each other, and a cycle of
    # constraints would need deferred creation on PostgreSQL.
    output_model_id: int | None = None
    parent_id: int | None = Field(default=None, foreign_key="jobs.id", index=True)
    # Delivery bookkeeping: a message carries (job id, attempt); only the
    # message of the current attempt may run the job, so a redelivered or
    # duplicated message never runs it twice.
    attempt: int = 0
    task_id: str | None = Field(default=None, max_length=64)
    worker: str | None = Field(default=None, max_length=200)
    heartbeat_at: datetime | None = None
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class JobPublic(JobBase):
    id: int
    status: str
    queue: str
    progress: float
    stage: str | None
    metrics: dict[str, Any]
    error: str | None
    output_model_id: int | None
    parent_id: int | None
    attempt: int
    worker: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


# --------------------------------------------------------------------------- models


class ModelBase(SQLModel):
    name: str = Field(max_length=200)
    format: str = Field(max_length=16, index=True)
    parent_id: int | None = Field(default=None, foreign_key="models.id", index=True)
    job_id: int | None = Field(default=None, foreign_key="jobs.id")
    size_bytes: int
    num_labels: int
    # The name of each class id, from the training data (None: plain ids).
    label_names: list[str] | None = Field(default=None, sa_column=Column(JSON))
    info: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Model(ModelBase, table=True):
    __tablename__ = "models"
    id: int | None = Field(default=None, primary_key=True)
    path: str = Field(description="folder path relative to the artifact folder")
    created_at: datetime = Field(default_factory=utcnow)


class EvaluationBase(SQLModel):
    model_id: int = Field(foreign_key="models.id", index=True)
    dataset_id: int = Field(foreign_key="datasets.id")
    job_id: int | None = Field(default=None, foreign_key="jobs.id")
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Evaluation(EvaluationBase, table=True):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("model_id", "dataset_id", name="uq_eval_model_dataset"),)
    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)


class EvaluationPublic(EvaluationBase):
    id: int
    created_at: datetime


class ModelPublic(ModelBase):
    id: int
    created_at: datetime
    evaluations: list[EvaluationPublic] = Field(default_factory=list)


# --------------------------------------------------------------------------- deployments


class Deployment(SQLModel, table=True):
    """One promotion or rollback. The served model is the newest row's model."""

    __tablename__ = "deployments"
    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="models.id")
    action: str = Field(default="promote", max_length=16)
    # A promotion undone by a rollback is marked so the next rollback goes
    # further back instead of bouncing between two models.
    reverted: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class DeploymentPublic(SQLModel):
    id: int
    model_id: int
    action: str
    reverted: bool
    created_at: datetime
