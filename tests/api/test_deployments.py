"""Promotion, rollback and deployment history through the real API process."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from tests.deploy.helpers import fake_model_folder, register_model
from tests.stack import Stack


@pytest.fixture
def stack(make_stack: Callable[..., Stack], backend: str) -> Stack:
    s = make_stack(backend)
    s.start_api()
    return s


def _models(stack: Stack, *labels: int) -> list[int]:
    """Register servable (weightless) models with the given label counts."""
    ids = []
    for i, n in enumerate(labels):
        folder = fake_model_folder(stack.root / "src" / str(i), num_labels=n)
        ids.append(register_model(stack, folder, name=f"m{i}", num_labels=n))
    return ids


def _served(stack: Stack) -> int | None:
    r = stack.http.get("/deployments/current")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return int(r.json()["model_id"])


def test_promote_rollback_history(stack: Stack) -> None:
    a, b, c = _models(stack, 2, 2, 2)

    r = stack.http.get("/deployments/current")
    assert r.status_code == 404 and "no model has been promoted" in r.json()["detail"]
    r = stack.http.post("/deployments/rollback")
    assert r.status_code == 409 and "nothing to roll back" in r.json()["detail"]
    r = stack.http.post("/models/999/promote")
    assert r.status_code == 404 and "model 999 not found" in r.json()["detail"]

    r = stack.http.post(f"/models/{a}/promote")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["model_id"] == a and body["action"] == "promote" and body["current"] is True
    assert body["previous_model_id"] is None
    assert body["num_labels"] == 2 and body["model_format"] == "pytorch"
    r = stack.http.post("/deployments/rollback")
    assert r.status_code == 409 and "only promotion" in r.json()["detail"]

    # Promoting the served model again records nothing.
    r = stack.http.post(f"/models/{a}/promote")
    assert r.status_code == 200 and r.json()["id"] == body["id"]

    for m in (b, c):
        assert stack.http.post(f"/models/{m}/promote").status_code == 201
    assert _served(stack) == c

    # Consecutive rollbacks walk back: c -> b -> a, then nothing is left.
    r = stack.http.post("/deployments/rollback")
    assert r.status_code == 201, r.text
    assert r.json()["model_id"] == b and r.json()["action"] == "rollback"
    assert r.json()["previous_model_id"] == c
    assert _served(stack) == b
    assert stack.http.post("/deployments/rollback").json()["model_id"] == a
    assert _served(stack) == a
    r = stack.http.post("/deployments/rollback")
    assert r.status_code == 409, r.text
    assert _served(stack) == a

    # A new promotion after rollbacks, then rolling it back returns to a.
    assert stack.http.post(f"/models/{c}/promote").status_code == 201
    assert stack.http.post("/deployments/rollback").json()["model_id"] == a

    history = stack.http.get("/deployments").json()
    assert [(d["model_id"], d["action"], d["reverted"]) for d in history] == [
        (a, "rollback", False),
        (c, "promote", True),
        (a, "rollback", False),
        (b, "rollback", False),
        (c, "promote", True),
        (b, "promote", True),
        (a, "promote", False),
    ]
    assert [d["current"] for d in history] == [True] + [False] * 6
    ids = [d["id"] for d in history]
    assert ids == sorted(ids, reverse=True)
    assert all(d["created_at"] for d in history)
    assert len(stack.http.get("/deployments", params={"limit": 2}).json()) == 2


def test_promote_refuses_unservable_and_label_mismatch(stack: Stack) -> None:
    two, three = _models(stack, 2, 3)
    no_folder = register_model(stack, None, name="lost", num_labels=2)
    odd_format = register_model(
        stack, fake_model_folder(stack.root / "src" / "odd"), name="odd", fmt="tflite"
    )
    gone = _models(stack, 2)[0]
    shutil.rmtree(stack.root / "artifacts" / "models" / str(gone))

    r = stack.http.post(f"/models/{no_folder}/promote")
    assert r.status_code == 409 and "missing" in r.json()["detail"], r.text
    r = stack.http.post(f"/models/{gone}/promote")
    assert r.status_code == 409 and "missing" in r.json()["detail"], r.text
    r = stack.http.post(f"/models/{odd_format}/promote")
    assert r.status_code == 409 and "'tflite'" in r.json()["detail"], r.text
    assert stack.http.get("/deployments").json() == []

    assert stack.http.post(f"/models/{two}/promote").status_code == 201
    r = stack.http.post(f"/models/{three}/promote")
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "['0', '1', '2']" in detail and "force=true" in detail
    assert _served(stack) == two
    r = stack.http.post(f"/models/{three}/promote", params={"force": "true"})
    assert r.status_code == 201, r.text
    assert _served(stack) == three


def test_write_calls_need_the_api_key(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack("sqlite", api_key="s3cret")
    stack.start_api()
    (m,) = _models(stack, 2)
    assert stack.http.post(f"/models/{m}/promote").status_code == 401
    assert stack.http.post("/deployments/rollback").status_code == 401
    assert stack.http.get("/deployments").status_code == 200
    r = stack.http.post(f"/models/{m}/promote", headers={"X-API-Key": "s3cret"})
    assert r.status_code == 201, r.text
