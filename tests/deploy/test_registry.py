"""Model switching logic and the inference app in process, with fake models."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from deploy.inference import create_app
from deploy.registry import ModelRegistry
from pipeline.preprocess import Tokens
from textcls.deployments import ServedModel, deployment_channel
from textcls.settings import Settings


class FakePredictor:
    def __init__(self, folder: Path) -> None:
        self.label = int(folder.name)  # folder "models/<id>": predicts class id % 2
        self.device = "cpu"
        self.closed = False

    def close(self) -> None:
        self.closed = True

    # Serving's contract: tokenize as a request arrives, predict on a batch of tokens.
    def tokenize(self, texts: Sequence[str]) -> list[Tokens]:
        return [Tokens([2, *range(5, 5 + len(t)), 3], [0] * (len(t) + 2)) for t in texts]

    def predict_tokens(self, tokens: Sequence[Tokens]) -> tuple[list[int], list[float]]:
        return [self.label % 2] * len(tokens), [0.9] * len(tokens)


class Db:
    """A stand-in for the deployments table."""

    def __init__(self) -> None:
        self.served: ServedModel | None = None
        self.next_id = 1

    def deploy(self, model_id: int) -> None:
        self.served = ServedModel(self.next_id, "promote", model_id, "pytorch", f"m/{model_id}", 2)
        self.next_id += 1

    def __call__(self) -> ServedModel | None:
        return self.served


def _registry(db: Db, loader: Any = None, **kwargs: Any) -> ModelRegistry:
    return ModelRegistry(
        resolve_target=db,
        model_path=lambda t: Path(f"/models/{t.model_id}"),
        loader=loader or (lambda folder, _device, _threads: FakePredictor(folder)),
        **kwargs,
    )


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_polling_picks_up_a_deployment_without_any_message() -> None:
    db = Db()
    reg = _registry(db, poll_interval=0.1)
    reg.start()
    try:
        _wait(lambda: reg.target_known)
        assert reg.current is None and "no model is deployed" in reg.unavailable_reason()
        db.deploy(3)
        _wait(lambda: reg.current is not None and reg.current.model_id == 3)
        db.deploy(4)
        _wait(lambda: reg.current is not None and reg.current.model_id == 4)
    finally:
        reg.stop()


def test_failed_load_keeps_the_old_model_and_backs_off() -> None:
    db = Db()
    calls: list[int] = []

    def loader(folder: Path, _device: str, _threads: int | None) -> FakePredictor:
        calls.append(int(folder.name))
        if folder.name == "5":
            raise OSError("weights are corrupt")
        return FakePredictor(folder)

    reg = _registry(db, loader, retry_interval=60)
    db.deploy(4)
    assert reg.refresh() is not None
    old = reg.current
    db.deploy(5)
    reg.refresh()
    reg.refresh()  # within the retry interval: not tried again
    assert reg.current is old and calls == [4, 5]
    assert reg.last_error is not None and reg.last_error["model_id"] == 5
    assert "weights are corrupt" in reg.last_error["error"]
    assert reg.status()["ready"] is True
    db.deploy(5)  # a new deployment of the same model is tried at once
    reg.refresh()
    assert calls == [4, 5, 5]
    db.deploy(4)  # back to the served model: nothing to load, the error is over
    reg.refresh()
    assert calls == [4, 5, 5] and reg.last_error is None and reg.current is old


def test_a_model_superseded_while_loading_is_not_swapped_in() -> None:
    db = Db()
    db.deploy(1)
    reg = _registry(db)
    reg.refresh()

    def slow_loader(folder: Path, _device: str, _threads: int | None) -> FakePredictor:
        db.deploy(3)  # another promotion lands while model 2 loads
        return FakePredictor(folder)

    reg._loader = slow_loader
    db.deploy(2)
    reg.refresh()
    assert reg.current is not None and reg.current.model_id == 1


def test_in_process_app_api_key_ready_and_pinning() -> None:
    db = Db()
    settings = Settings(predict_api_key="k", batch_max_wait_ms=1)
    app = create_app(
        settings,
        loader=lambda folder, _d, _t: FakePredictor(folder),
        resolve_target=db,
        model_path=lambda t: Path(f"/models/{t.model_id}"),
        subscribe=False,
    )
    key = {"X-API-Key": "k"}
    with TestClient(app) as client:
        assert client.post("/predict", json={"text": "x"}).status_code == 401
        assert (
            client.post("/predict", json={"text": "x"}, headers={"X-API-Key": "no"}).status_code
            == 401
        )
        r = client.post("/predict", json={"text": "x"}, headers=key)
        assert r.status_code == 503, r.text
        assert client.get("/ready").status_code == 503
        db.deploy(7)
        app.state.registry.nudge()
        _wait(lambda: client.get("/ready").status_code == 200)
        r = client.post(
            "/predict", json={"text": ["a", "b"]}, headers={"Authorization": "Bearer k"}
        )
        assert r.json() == {
            "categories": [1, 1],
            "probabilities": [0.9, 0.9],
            "model_id": 7,
            "labels": ["1", "1"],
        }
        assert client.get("/health").status_code == 200
        assert 'textcls_predict_requests_total{status="401"} 2.0' in client.get("/metrics").text

        # Requests pin the model they started with, across a swap.
        pinned = app.state.registry.current
        release = threading.Event()
        original = pinned.predictor.predict_tokens

        def slow(tokens: Sequence[Tokens]) -> tuple[list[int], list[float]]:
            release.wait(5)
            return original(tokens)

        pinned.predictor.predict_tokens = slow
        results: list[Any] = []
        t = threading.Thread(
            target=lambda: results.append(client.post("/predict", json={"text": "x"}, headers=key))
        )
        t.start()
        time.sleep(0.2)
        db.deploy(8)
        app.state.registry.nudge()
        _wait(lambda: client.get("/ready").json()["model_id"] == 8)
        assert not pinned.predictor.closed  # still in use by the request
        release.set()
        t.join()
        assert results[0].json()["model_id"] == 7
        assert pinned.users == 0 and pinned.predictor.closed  # freed once it finished
        assert not app.state.registry.current.predictor.closed
        assert client.post("/predict", json={"text": "x"}, headers=key).json()["categories"] == 0


def test_channel_is_scoped_by_redis_database() -> None:
    assert deployment_channel("redis://h:6379/0") == "textcls:deployments"
    assert deployment_channel("redis://h:6379") == "textcls:deployments"
    assert deployment_channel("redis://h:6379/3") == "textcls:deployments:db3"
