"""The stack with its artifacts in an S3 bucket: moto's server, its own process.

API, worker and inference processes, each "host" with its own data folder
(its cache), nothing shared but PostgreSQL, Redis and the bucket. A real tiny
model is trained, evaluated twice on a second worker host (the second job
fetches nothing: the server's request log says so), scored into predictions
that the API serves, promoted and served by an inference worker that fetched
it once; deleting a job deletes its objects, and the database agrees with the
bucket throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from pipeline.corpus import Splits
from tests.objectstore import AWS_ENV, MotoServer
from tests.stack import Stack
from textcls.client import wait_ready
from textcls.consistency import check_consistency
from textcls.db import engine_for
from textcls.settings import Settings
from textcls.store import ArtifactStore

TRAIN = {"base_model": "scratch:tiny", "epochs": 1, "max_length": 32, "batch_size": 32}


def _succeeded(stack: Stack, kind: str, **params: Any) -> dict[str, Any]:
    job = stack.wait_job(stack.submit(kind, **params)["id"], timeout=240)
    assert job["status"] == "succeeded", (job, stack.logs())
    return job


def _gets(moto: MotoServer, prefix: str) -> int:
    return sum(1 for method, path, _ in moto.requests() if method == "GET" and prefix in path)


def test_a_stack_on_an_object_store(
    make_stack: Callable[..., Stack],
    s3_settings: dict[str, str],
    moto_server: MotoServer,
    job_splits: Splits,
    tmp_path: Path,
) -> None:
    stack = make_stack("postgres", log_upload_seconds=1, **s3_settings)
    bucket_path = f"/{s3_settings['artifact_url'].split('/')[2]}/artifacts"
    stack.start_api()
    host_a = stack.start_worker("host-a", TEXTCLS_DATA_DIR=str(tmp_path / "host-a"))
    train_id = stack.upload(job_splits.train)["id"]
    dev_id = stack.upload(job_splits.dev)["id"]
    job = _succeeded(stack, "train", dataset_id=train_id, eval_dataset_id=dev_id, **TRAIN)
    model_id = job["output_model_id"]
    assert not (stack.root / "artifacts").exists(), "nothing goes to a local artifact folder"
    # The log went up with the job; the API reads it from the bucket.
    r = stack.http.get(f"/jobs/{job['id']}/logs")
    assert (
        r.status_code == 200 and f"job {job['id']} (train) attempt 0 started on host-a@" in r.text
    )

    # A second worker host: its first evaluation fetches the model, the second nothing.
    stack.group.stop(host_a)
    stack.start_worker("host-b", TEXTCLS_DATA_DIR=str(tmp_path / "host-b"))
    _succeeded(stack, "evaluate", model_id=model_id, dataset_id=dev_id)
    model_prefix = f"{bucket_path}/models/{model_id}/"
    fetched = _gets(moto_server, model_prefix)
    assert fetched >= 3, "host-b fetched the model folder"
    before = len(moto_server.requests())
    _succeeded(stack, "evaluate", model_id=model_id, dataset_id=dev_id)
    after = moto_server.requests()[before:]
    artifact_gets = [
        r for r in after if r[0] in {"GET", "HEAD"} and ("/models/" in r[1] or "/datasets/" in r[1])
    ]
    assert artifact_gets == [], artifact_gets

    pred = _succeeded(stack, "predict", model_id=model_id, dataset_id=dev_id)
    r = stack.http.get(f"/jobs/{pred['id']}/predictions")
    assert r.status_code == 200 and r.text.startswith("index\tsentence\tcategory"), r.text[:200]
    assert len(r.text.splitlines()) == 101

    # Promotion: the inference host fetches the model once, then serves it.
    inference_host = tmp_path / "inference-host"
    before_gets = _gets(moto_server, model_prefix)
    assert stack.http.post(f"/models/{model_id}/promote").status_code == 201, stack.logs()
    _, url = stack.start_inference(TEXTCLS_DATA_DIR=str(inference_host))
    wait_ready(url, model_id)
    r = httpx.post(f"{url}/predict", json={"text": ["很好", "太差了"]}, timeout=30)
    assert r.status_code == 200 and r.json()["model_id"] == model_id, r.text
    assert (inference_host / "cache" / "models" / str(model_id) / "config.json").is_file()
    assert _gets(moto_server, model_prefix) - before_gets == fetched, "one download"

    # Deleting the predict job deletes its objects; the database agrees with the bucket.
    assert stack.http.delete(f"/jobs/{pred['id']}").status_code == 200
    checker = ArtifactStore.from_settings(
        Settings(data_dir=tmp_path / "checker", **s3_settings)  # type: ignore[arg-type]
    )
    assert checker.stat(f"predictions/{pred['id']}.tsv") is None
    assert f"{pred['id']}.log" not in checker.scan("logs")
    with Session(engine_for(stack.database_url)) as session:
        assert check_consistency(session, checker) == []


def test_an_unreachable_object_store_is_a_503(
    make_stack: Callable[..., Stack], job_splits: Splits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store away (nothing listens at its endpoint): the upload says so, nothing is kept."""
    from launch.procs import free_port

    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    stack = make_stack(
        artifact_url="s3://textcls-away/artifacts",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    stack.start_api()
    files = {"file": ("t.tsv", job_splits.dev.read_bytes(), "text/tab-separated-values")}
    r = stack.http.post("/datasets", files=files)
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert r.json()["detail"] == "artifact store unavailable, try again shortly"
    assert stack.http.get("/datasets").json() == []
