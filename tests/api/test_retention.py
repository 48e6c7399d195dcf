"""``DELETE /datasets|models|jobs/{id}`` through the real API process, on SQLite and PostgreSQL.

No worker runs here: a submitted job stays queued, which is what "in use by an
unfinished job" needs. Deleting finished jobs with real outputs is in
``tests/workers/test_job_logs.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.helpers import fake_model_folder, register_model
from tests.reliability.helpers import TINY_TSV, consistency_problems
from tests.stack import Stack


@pytest.fixture
def stack(make_stack: Callable[..., Stack], backend: str) -> Stack:
    s = make_stack(backend)
    s.start_api()
    return s


def _model(stack: Stack, name: str, parent_id: int | None = None) -> int:
    folder = fake_model_folder(stack.root / "src" / name)
    return register_model(stack, folder, name=name, parent_id=parent_id)


def _dataset(stack: Stack, name: str) -> int:
    path = stack.root / f"{name}.tsv"
    path.write_text(TINY_TSV, encoding="utf-8")
    return int(stack.upload(path, name)["id"])


def _artifact(stack: Stack, relpath: str) -> Path:
    return stack.root / "artifacts" / relpath


def _detail(r: object) -> str:
    return str(r.json()["detail"])  # type: ignore[attr-defined]


def test_models_in_use_are_refused_and_cascade_says_what_went(stack: Stack) -> None:
    root = _model(stack, "root")
    child = _model(stack, "child", root)
    grandchild = _model(stack, "grandchild", child)
    served, previous, spare = (_model(stack, n) for n in ("served", "previous", "spare"))
    for m in (spare, previous, served):
        assert stack.http.post(f"/models/{m}/promote").status_code == 201
    assert stack.http.post("/deployments/rollback").json()["model_id"] == previous
    assert stack.http.post(f"/models/{served}/promote").status_code == 201
    # History: spare, previous (promote), served (reverted), rollback to previous, served.

    r = stack.http.delete(f"/models/{served}")
    assert r.status_code == 409 and f"model {served}: it is the served model" in _detail(r)
    r = stack.http.delete(f"/models/{previous}")
    assert r.status_code == 409 and "a rollback would return to it" in _detail(r), r.text
    r = stack.http.delete(f"/models/{root}")
    assert r.status_code == 409, r.text
    assert f"models {child}, {grandchild} are derived from it" in _detail(r)
    assert "cascade=true" in _detail(r)
    assert stack.http.get(f"/models/{root}").status_code == 200

    r = stack.http.delete(f"/models/{root}", params={"cascade": "true"})
    assert r.status_code == 200, r.text
    gone = r.json()
    assert gone["models"] == [grandchild, child, root]
    assert gone["files"] == [f"models/{m}" for m in sorted((root, child, grandchild))]
    for m in (root, child, grandchild):
        assert stack.http.get(f"/models/{m}").status_code == 404
        assert not _artifact(stack, f"models/{m}").exists()

    # Bad input changes nothing.
    assert stack.http.delete("/models/999").status_code == 404
    assert "model 999 not found" in _detail(stack.http.delete("/models/999"))
    assert stack.http.delete("/models/0").status_code == 422
    assert stack.http.delete("/models/x").status_code == 422
    assert stack.http.delete(f"/models/{spare}", params={"cascade": "maybe"}).status_code == 422
    assert stack.http.get(f"/models/{spare}").status_code == 200
    assert consistency_problems(stack) == []


def test_unfinished_jobs_hold_their_inputs(stack: Stack) -> None:
    model = _model(stack, "m")
    data = _dataset(stack, "data")
    other = _dataset(stack, "other")
    job = stack.submit("evaluate", model_id=model, dataset_id=data)
    assert job["status"] == "queued"  # no worker in this stack

    r = stack.http.delete(f"/datasets/{data}")
    assert r.status_code == 409, r.text
    assert f"job {job['id']} (evaluate, queued) reads it as dataset_id" in _detail(r)
    r = stack.http.delete(f"/models/{model}")
    assert r.status_code == 409 and f"job {job['id']} (evaluate, queued)" in _detail(r)
    r = stack.http.delete(f"/jobs/{job['id']}")
    assert r.status_code == 409 and "only finished jobs" in _detail(r), r.text
    assert stack.http.delete("/jobs/999").status_code == 404
    assert stack.http.delete("/datasets/999").status_code == 404
    # A list of datasets (pretrain's dataset_ids) holds each of them.
    corpus = _dataset(stack, "corpus")
    pre = stack.submit("pretrain", dataset_ids=[data, corpus])
    r = stack.http.delete(f"/datasets/{corpus}")
    assert r.status_code == 409, r.text
    assert f"job {pre['id']} (pretrain, queued) reads it as dataset_ids" in _detail(r)
    assert stack.http.post(f"/jobs/{pre['id']}/cancel").json()["status"] == "cancelled"
    assert stack.http.delete(f"/datasets/{corpus}").status_code == 200

    r = stack.http.delete(f"/datasets/{other}")
    assert r.status_code == 200, r.text
    assert r.json()["datasets"] == [other] and r.json()["files"] == [f"datasets/{other}.tsv"]
    assert stack.http.get(f"/datasets/{other}").status_code == 404

    assert stack.http.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    r = stack.http.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["jobs"] == [job["id"]], r.text
    assert stack.http.get(f"/jobs/{job['id']}").status_code == 404
    assert stack.http.get(f"/jobs/{job['id']}/logs").status_code == 404
    assert stack.http.delete(f"/datasets/{data}").status_code == 200
    r = stack.http.delete(f"/models/{model}")
    assert r.status_code == 200 and r.json()["models"] == [model], r.text
    assert consistency_problems(stack) == []


def test_a_deleted_model_takes_its_history_rows_not_the_rollback_stack(stack: Stack) -> None:
    a, b = _model(stack, "a"), _model(stack, "b")
    assert stack.http.post(f"/models/{a}/promote").status_code == 201
    assert stack.http.post(f"/models/{b}/promote").status_code == 201
    assert stack.http.post("/deployments/rollback").json()["model_id"] == a
    # b's promotion was rolled back: no rollback returns to it any more.
    b_rows = [d["id"] for d in stack.http.get("/deployments").json() if d["model_id"] == b]
    r = stack.http.delete(f"/models/{b}")
    assert r.status_code == 200, r.text
    assert r.json()["deployments"] == b_rows
    history = stack.http.get("/deployments").json()
    assert [d["model_id"] for d in history] == [a, a]
    assert stack.http.get("/deployments/current").json()["model_id"] == a
    assert consistency_problems(stack) == []


def test_deleting_needs_the_api_key(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack("sqlite", api_key="s3cret")
    stack.start_api()
    model = _model(stack, "m")
    for path in (f"/models/{model}", "/datasets/1", "/jobs/1"):
        assert stack.http.delete(path).status_code == 401
    assert stack.http.get(f"/models/{model}").status_code == 200
    r = stack.http.delete(f"/models/{model}", headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200, r.text
