"""The inference worker as real processes: shapes, bad input, swaps, replicas, batching.

One stack (API + inference worker) serves the whole module; two tiny models
that always answer class 0 (model A) and class 1 (model B) make it visible
which model produced each response.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.deploy.helpers import build_model_folder, fake_model_folder, register_model, wait_serving
from tests.stack import Stack

LIMITS = {"max_text_chars": 50, "max_batch_texts": 8, "max_request_bytes": 4096}


@dataclass
class Served:
    stack: Stack
    a: int
    b: int
    url: str  # the first inference worker, started before any promotion
    before: dict[str, Any] = field(default_factory=dict)

    def predict(self, body: Any, url: str | None = None) -> httpx.Response:
        return httpx.post(f"{url or self.url}/predict", json=body, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("inference")
    models = root / "models"
    stack = Stack(
        root / "stack",
        f"sqlite:///{root / 'stack' / 'textcls.db'}",
        redis_url,
        # A long poll: a switch within seconds proves the pub/sub nudge works.
        deployment_poll_interval=60,
        **LIMITS,
    )
    try:
        stack.start_api()
        _, url = stack.start_inference()
        before = {
            "predict": httpx.post(f"{url}/predict", json={"text": "你好"}, timeout=10),
            "ready": httpx.get(f"{url}/ready", timeout=10),
        }
        a = register_model(stack, build_model_folder(models / "a", label=0, seed=0), name="A")
        b = register_model(stack, build_model_folder(models / "b", label=1, seed=1), name="B")
        r = stack.http.post(f"/models/{a}/promote")
        assert r.status_code == 201, r.text
        wait_serving(url, a)
        yield Served(stack, a, b, url, before)
    finally:
        stack.close()


# --------------------------------------------------------------------------- basics


def test_before_any_promotion_503_and_not_ready(served: Served) -> None:
    r = served.before["predict"]
    assert r.status_code == 503
    assert "no model is deployed" in r.json()["detail"]
    r = served.before["ready"]
    assert r.status_code == 503 and r.json()["ready"] is False


def test_ready_health_and_seed_shapes(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{served.url}/ready").json()
    assert ready["model_id"] == served.a and ready["format"] == "pytorch"

    r = served.predict({"text": "这个东西很好用"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert type(body["categories"]) is int and body["categories"] == 0
    assert type(body["probabilities"]) is float and 0.5 < body["probabilities"] <= 1.0
    assert body["model_id"] == served.a

    r = served.predict({"text": ["一句", "两句", "质量一般，物流很慢"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["categories"] == [0, 0, 0]
    assert len(body["probabilities"]) == 3
    assert all(type(p) is float and 0.5 < p <= 1.0 for p in body["probabilities"])
    # The seed's keys, the served model, and the label names (ids as names here).
    assert set(body) == {"categories", "probabilities", "model_id", "labels"}
    assert body["labels"] == ["0", "0", "0"]

    # A list of one is still a list; the batch limit itself is accepted.
    assert served.predict({"text": ["一句"]}).json()["categories"] == [0]
    r = served.predict({"text": ["好"] * LIMITS["max_batch_texts"]})
    assert r.status_code == 200 and len(r.json()["categories"]) == LIMITS["max_batch_texts"]


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"", 422, "empty request body"),
        (b'{"text": "unterminated', 422, "invalid JSON"),
        (b"\xff\xfe\x00", 422, "UTF-8"),
        (b'"just a string"', 422, "JSON object"),
        (b"{}", 422, 'missing field "text"'),
        (b'{"text": ""}', 422, "empty string"),
        (b'{"text": "   "}', 422, "blank"),
        (b'{"text": []}', 422, "empty list"),
        (b'{"text": ["ok", 7]}', 422, "text[1] must be a string"),
        (b'{"text": ["ok", null]}', 422, "text[1] must be a string, got null"),
        (b'{"text": ["ok", " "]}', 422, "text[1] is blank"),
        (b'{"text": {"a": 1}}', 422, "string or a list of strings"),
        (b'{"text": true}', 422, "got boolean"),
        (json.dumps({"text": "长" * 51}).encode(), 422, "51 characters; the limit is 50"),
        (json.dumps({"text": ["a"] * 9}).encode(), 422, "9 items; the limit is 8"),
        (json.dumps({"text": "a" * 5000}).encode(), 413, "limit is 4096"),
    ],
    ids=[
        "empty-body", "bad-json", "not-utf8", "not-object", "missing-text", "empty-string",
        "blank", "empty-list", "number-item", "null-item", "blank-item", "object", "bool",
        "too-long", "too-many", "too-big",
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_4xx(
    served: Served, content: bytes, status: int, fragment: str
) -> None:
    r = httpx.post(
        f"{served.url}/predict",
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"], r.text


def test_chunked_body_over_the_limit_is_413(served: Served) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the worker must count
        yield b'{"text": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = httpx.post(f"{served.url}/predict", content=body(), timeout=10)
    assert r.status_code == 413, r.text


# --------------------------------------------------------------------------- metrics


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_batching_under_concurrency_and_metrics(served: Served) -> None:
    def run(threads: int, per_thread: int) -> float:
        errors: list[str] = []

        def client() -> None:
            with httpx.Client(base_url=served.url, timeout=30) as http:
                for i in range(per_thread):
                    r = http.post("/predict", json={"text": f"这个东西很好用{i}"})
                    if r.status_code != 200:
                        errors.append(r.text)

        workers = [threading.Thread(target=client) for _ in range(threads)]
        started = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors, errors[:3]
        return threads * per_thread / (time.perf_counter() - started)

    assert served.predict({"text": ""}).status_code == 422
    serial = run(1, 30)
    concurrent = run(16, 15)
    text = httpx.get(f"{served.url}/metrics").text
    batches = _metric(text, "textcls_batch_size_count")
    single = _metric(text, "textcls_batch_size_bucket", '{le="1.0"}')
    assert batches - single > 0, "no model call ever held more than one text"
    # Texts per model call went up, so throughput grows with concurrency.
    assert concurrent > serial * 1.2, (serial, concurrent)

    assert _metric(text, "textcls_predict_requests_total", '{status="200"}') >= 30 + 240
    assert _metric(text, "textcls_predict_requests_total", '{status="422"}') >= 1
    assert _metric(text, "textcls_predict_latency_seconds_count") >= 270
    # Every text's wait in the batching queue is observed once, when its call starts.
    assert _metric(text, "textcls_batch_queue_age_seconds_count") >= 270
    assert _metric(text, "textcls_model_id") == served.a
    assert _metric(text, "textcls_model_swaps_total") >= 1
    assert "textcls_model_load_failures_total" in text


# --------------------------------------------------------------------------- swaps


class Load:
    """Clients sending requests non-stop to some workers from several threads."""

    def __init__(self, urls: list[str], threads: int = 4) -> None:
        self.urls = urls
        self.results: list[tuple[str, float, int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)
        ]

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                url = self.urls[(n + i) % len(self.urls)]
                text: Any = "质量一般" if i % 2 else ["一句", "两句话", "物流很慢"]
                started = time.monotonic()
                try:
                    r = http.post(f"{url}/predict", json={"text": text})
                    status, body = r.status_code, r.json()
                except Exception as exc:  # a refused connection counts as a failure
                    status, body = -1, {"error": repr(exc)}
                with self._lock:
                    self.results.append((url, started, status, body))
                i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _labels(body: dict[str, Any]) -> set[int]:
    cats = body["categories"]
    return set(cats) if isinstance(cats, list) else {cats}


def _switch(served: Served, urls: list[str], call: Any, model_id: int) -> dict[str, float]:
    """Make the control-plane ``call`` under load; returns when each worker switched."""
    switched: dict[str, float] = {}
    with Load(urls) as load:
        time.sleep(0.5)
        r = call()
        assert r.status_code == 201, r.text
        for url in urls:
            wait_serving(url, model_id, timeout=30)
            switched[url] = time.monotonic()
        time.sleep(0.5)
    failed = [res for res in load.results if res[2] != 200]
    assert not failed, failed[:5]
    expect = {served.a: {0}, served.b: {1}}
    for url, started, _, body in load.results:
        # Each response comes whole from one model.
        assert _labels(body) == expect[body["model_id"]], body
        if started > switched[url]:
            assert body["model_id"] == model_id, (url, body)
    after = [res for res in load.results if res[1] > switched[res[0]]]
    assert len(after) >= 4 and len(load.results) >= 20
    return switched


def test_promote_under_load_replicas_rollback_and_late_worker(served: Served) -> None:
    stack, a, b = served.stack, served.a, served.b
    # A worker started after a promotion serves the promoted model.
    _, late = stack.start_inference()
    wait_serving(late, a)
    assert served.predict({"text": "好"}, late).json() == {
        "categories": 0,
        "probabilities": pytest.approx(served.predict({"text": "好"}).json()["probabilities"]),
        "model_id": a,
        "labels": "0",
    }
    urls = [served.url, late]

    t0 = time.monotonic()
    switched = _switch(served, urls, lambda: stack.http.post(f"/models/{b}/promote"), b)
    # Far sooner than the 60 s poll: the pub/sub nudge reached both replicas.
    assert max(switched.values()) - t0 < 30
    for url in urls:
        assert served.predict({"text": ["一句", "两句"]}, url).json()["categories"] == [1, 1]

    _switch(served, urls, lambda: stack.http.post("/deployments/rollback"), a)
    for url in urls:
        assert served.predict({"text": "一句"}, url).json()["categories"] == 0

    # A model that fails to load leaves the old one serving, and /ready says why.
    broken = register_model(stack, fake_model_folder(stack.root / "broken"), name="broken")
    assert stack.http.post(f"/models/{broken}/promote").status_code == 201
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = httpx.get(f"{served.url}/ready").json()
        if ready["last_error"]:
            break
        time.sleep(0.2)
    assert ready["model_id"] == a and ready["last_error"]["model_id"] == broken, ready
    assert served.predict({"text": "一句"}).json()["model_id"] == a
    assert stack.http.post("/deployments/rollback").json()["model_id"] == a

    history = stack.http.get("/deployments").json()
    assert [(d["model_id"], d["action"]) for d in history] == [
        (a, "rollback"),
        (broken, "promote"),
        (a, "rollback"),
        (b, "promote"),
        (a, "promote"),
    ]
    metrics = httpx.get(f"{late}/metrics").text
    assert _metric(metrics, "textcls_model_swaps_total") == 3
    assert _metric(metrics, "textcls_model_id") == a


def test_no_500_anywhere(served: Served) -> None:
    for url in [served.url]:
        text = httpx.get(f"{url}/metrics").text
        assert 'textcls_predict_requests_total{status="500"}' not in text
    assert "Traceback" not in (served.stack.root / "logs" / "api.log").read_text()
