"""Job submission validation: every bad request gets a 4xx naming the field."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.stack import Stack

GOOD = "index\tsentence\tlabel\n0\t这个东西很好\t1\n1\t太差了\t0\n"


@pytest.fixture
def stack(make_stack: Callable[..., Stack], backend: str) -> Stack:
    s = make_stack(backend)
    s.start_api()
    return s


def _submit(stack: Stack, body: object) -> tuple[int, object]:
    r = stack.http.post("/jobs", json=body)
    return r.status_code, r.json()


def _locs(detail: object) -> list[str]:
    assert isinstance(detail, list), detail
    return [".".join(str(x) for x in e["loc"]) for e in detail]


def test_bad_job_requests(stack: Stack) -> None:
    files = {"file": ("d.tsv", GOOD.encode(), "text/tab-separated-values")}
    ds = stack.http.post("/datasets", files=files).json()

    code, body = _submit(stack, {"kind": "bake", "params": {}})
    assert code == 422 and _locs(body["detail"]) == ["body.kind"]  # type: ignore[index]
    assert "unknown job kind" in str(body)

    code, body = _submit(stack, {"kind": "train", "params": {}})
    assert code == 422 and "body.params.dataset_id" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(stack, {"kind": "train", "params": {"dataset_id": ds["id"], "epoch": 3}})
    assert code == 422 and "body.params.epoch" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(
        stack, {"kind": "train", "params": {"dataset_id": ds["id"], "epochs": "x"}}
    )
    assert code == 422 and "body.params.epochs" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(stack, {"kind": "train", "params": {"dataset_id": 9999}})
    assert code == 422 and "body.params.dataset_id" in _locs(body["detail"])  # type: ignore[index]
    assert "does not exist" in str(body)

    code, body = _submit(stack, {"kind": "export", "params": {"model_id": 12345}})
    assert code == 422 and "body.params.model_id" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(
        stack, {"kind": "train", "params": {"dataset_id": ds["id"], "num_labels": 5}}
    )
    assert code == 422 and "body.params.num_labels" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(
        stack, {"kind": "train", "params": {"dataset_id": ds["id"], "queue": "../x"}}
    )
    assert code == 422 and "body.params.queue" in _locs(body["detail"])  # type: ignore[index]

    for kind in ("train", "pipeline"):
        params = {"dataset_id": ds["id"], "eval_dataset_id": ds["id"], "baseline_weight": 1.5}
        code, body = _submit(stack, {"kind": kind, "params": params})
        assert code == 422 and "body.params.baseline_weight" in _locs(body["detail"])  # type: ignore[index]

    code, body = _submit(stack, "not an object")
    assert code == 422

    # Nothing was stored for any of them.
    assert stack.http.get("/jobs").json() == []
    assert stack.http.get("/jobs/77").status_code == 404
    assert stack.http.post("/jobs/77/cancel").status_code == 404
    assert stack.http.get("/models/77").status_code == 404


def test_queued_job_visible_and_filterable(stack: Stack) -> None:
    files = {"file": ("d.tsv", GOOD.encode(), "text/tab-separated-values")}
    ds = stack.http.post("/datasets", files=files).json()
    # No worker runs here, so the job stays queued.
    job = stack.submit("train", dataset_id=ds["id"], epochs=1)
    assert job["status"] == "queued" and job["queue"] == "gpu" and job["progress"] == 0
    other = stack.submit("train", dataset_id=ds["id"], queue="special")
    assert other["queue"] == "special"
    assert [j["id"] for j in stack.http.get("/jobs", params={"status": "queued"}).json()] == [
        other["id"],
        job["id"],
    ]
    assert stack.http.get("/jobs", params={"kind": "export"}).json() == []
    assert stack.http.get("/jobs", params={"status": "bogus"}).status_code == 422
    # Cancelling a queued job is immediate; a second cancel is a conflict.
    r = stack.http.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert stack.http.post(f"/jobs/{job['id']}/cancel").status_code == 409
