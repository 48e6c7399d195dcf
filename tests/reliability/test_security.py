"""Security and bad input against a live stack: keys, paths, oversized bodies, fuzzing.

One stack with both API keys set and small limits serves the module: the API
and an inference worker serving a tiny model (no Celery worker: submitted jobs
just wait). The schemathesis runs send every key, so the fuzzer reaches the
real handlers, and fail on any 5xx.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from launch.procs import free_port
from tests.deploy.helpers import register_model, wait_serving
from tests.reliability.helpers import TINY_TSV, consistency_problems
from tests.stack import Stack

API_KEY = "api-key-for-tests-0123456789"
PREDICT_KEY = "predict-key-for-tests-9876543210"
LIMITS = {
    "max_upload_bytes": 4096,
    "max_request_bytes": 16384,
    "max_text_chars": 200,
    "max_batch_texts": 16,
}


@dataclass
class Secured:
    stack: Stack
    inference: str
    model_id: int
    dataset_id: int

    def post(self, path: str, key: str | None = API_KEY, **kwargs: Any) -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return self.stack.http.post(path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model: Path
) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    # The API forwards POST /deployments/try to this inference worker.
    inference_port = free_port()
    stack = Stack(
        root / "stack",
        f"sqlite:///{root / 'stack' / 'textcls.db'}",
        redis_url,
        api_key=API_KEY,
        predict_api_key=PREDICT_KEY,
        inference_url=f"http://127.0.0.1:{inference_port}",
        deployment_poll_interval=1,
        **LIMITS,
    )
    try:
        stack.start_api()
        _, inference = stack.start_inference(inference_port)
        model_id = register_model(stack, tiny_model, name="tiny")
        files = {"file": ("tiny.tsv", TINY_TSV.encode(), "text/tab-separated-values")}
        r = stack.http.post("/datasets", files=files, headers={"X-API-Key": API_KEY})
        assert r.status_code == 201, r.text
        dataset_id = int(r.json()["id"])
        r = stack.http.post(f"/models/{model_id}/promote", headers={"X-API-Key": API_KEY})
        assert r.status_code == 201, r.text
        wait_serving(inference, model_id)
        yield Secured(stack, inference, model_id, dataset_id)
    finally:
        stack.close()


# --------------------------------------------------------------------------- API keys


def test_every_state_changing_route_requires_the_key() -> None:
    """Route inspection: each non-GET control-plane route depends on require_api_key."""
    from fastapi.routing import APIRoute

    from api.deps import require_api_key
    from api.main import create_app

    def calls(dependant: Any) -> set[Any]:
        out = {dependant.call}
        for sub in dependant.dependencies:
            out |= calls(sub)
        return out

    def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # an included router
                yield from api_routes(route.original_router.routes)

    routes = list(api_routes(create_app(reaper=False).routes))
    writes = [r for r in routes if r.methods - {"GET", "HEAD"}]
    assert {"/datasets", "/jobs", "/jobs/{job_id}/cancel", "/deployments/rollback"} <= {
        r.path for r in writes
    }
    unguarded = [r.path for r in writes if require_api_key not in calls(r.dependant)]
    assert unguarded == []


def _write_operations(stack: Stack) -> list[tuple[str, str]]:
    """(method, path) of every state-changing route in the OpenAPI schema."""
    spec = stack.http.get("/openapi.json").json()
    ops = []
    for path, methods in spec["paths"].items():
        for method in methods:
            if method.upper() not in {"GET", "HEAD"}:
                assert method in ("post", "delete"), (path, method)
                for name in ("{job_id}", "{model_id}", "{dataset_id}"):
                    path = path.replace(name, "1")
                ops.append((method.upper(), path))
    return ops


def test_writes_need_the_api_key_reads_do_not(secured: Secured) -> None:
    stack = secured.stack
    ops = _write_operations(stack)
    assert ("POST", "/deployments/rollback") in ops and ("POST", "/models/1/promote") in ops
    assert ("DELETE", "/models/1") in ops and ("DELETE", "/datasets/1") in ops
    for method, path in ops:
        for key in (None, "wrong-key"):
            headers = {"X-API-Key": key} if key else {}
            r = stack.http.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, key, r.status_code, r.text)
            assert "API key" in r.json()["detail"]
    for path in ("/jobs", "/datasets", "/models", "/deployments", "/health", "/openapi.json"):
        assert stack.http.get(path).status_code == 200, path

    # With the key (either header) every write goes through.
    files = {"file": ("more.tsv", TINY_TSV.encode(), "text/tab-separated-values")}
    assert secured.post("/datasets", files=files).status_code == 201
    body = {"kind": "evaluate", "params": {"model_id": secured.model_id, "dataset_id": 1}}
    job = secured.post("/jobs", json=body)
    assert job.status_code == 202, job.text
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    r = stack.http.post(f"/jobs/{job.json()['id']}/cancel", headers=bearer)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    r = secured.post(f"/models/{secured.model_id}/promote")
    assert r.status_code == 200, r.text  # already served: nothing recorded
    r = secured.post("/deployments/rollback")
    assert r.status_code == 409 and "nothing to roll back" in r.json()["detail"], r.text


def test_predict_key_is_separate(secured: Secured) -> None:
    url = f"{secured.inference}/predict"
    body = {"text": ["很好", "太差了"]}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"X-API-Key": API_KEY}).status_code == 401
    r = httpx.post(url, json=body, headers={"X-API-Key": PREDICT_KEY})
    assert r.status_code == 200 and r.json()["model_id"] == secured.model_id, r.text
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {PREDICT_KEY}"})
    assert r.status_code == 200, r.text
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{secured.inference}{path}").status_code == 200, path


# --------------------------------------------------------------------------- paths


def _job(secured: Secured, kind: str, **params: Any) -> httpx.Response:
    return secured.post("/jobs", json={"kind": kind, "params": params})


def _refused(r: httpx.Response, field: str) -> str:
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field for e in errors), errors
    return " ".join(e["msg"] for e in errors)


def test_user_named_model_folders_stay_inside_the_import_folder(secured: Secured) -> None:
    root = secured.stack.root
    imports = root / "imports"
    imports.mkdir(exist_ok=True)
    (imports / "escape").symlink_to("/etc")
    bad = [
        "../../etc",
        "../../../../etc/passwd",
        "/etc",
        "~/.ssh",
        "./models",
        str(imports / "escape"),
    ]
    for value in bad:
        msg = _refused(_job(secured, "train", dataset_id=1, base_model=value), "base_model")
        assert "imports" in msg or "absolute" in msg, msg
        _refused(
            _job(secured, "pipeline", dataset_id=1, eval_dataset_id=1, base_model=value),
            "base_model",
        )
        _refused(
            _job(
                secured,
                "distill",
                teacher_model_id=secured.model_id,
                dataset_id=1,
                student_model_dir=value,
            ),
            "student_model_dir",
        )
    _refused(_job(secured, "train", dataset_id=1, base_model="a b/c d"), "base_model")
    # Inside the import folder (or a hub id, or a preset) is accepted and stored resolved.
    ok = _job(secured, "train", dataset_id=1, base_model=str(imports / "x" / ".." / "bert"))
    assert ok.status_code == 202, ok.text
    assert ok.json()["params"]["base_model"] == str((imports / "bert").resolve())
    for value in ("scratch:tiny", "hfl/rbt3"):
        assert _job(secured, "train", dataset_id=1, base_model=value).status_code == 202
    for job in secured.stack.http.get("/jobs", params={"status": "queued"}).json():
        secured.post(f"/jobs/{job['id']}/cancel")


def test_dataset_names_never_become_paths(secured: Secured) -> None:
    store = secured.stack.root / "artifacts"
    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    for filename, name in (
        ("../../evil.tsv", None),
        ("ok.tsv", "../../evil"),
        ("ok.tsv", "/etc/x"),
    ):
        files = {"file": (filename, TINY_TSV.encode(), "text/tab-separated-values")}
        r = secured.post("/datasets", files=files, data={"name": name} if name else None)
        assert r.status_code == 422 and "name" in r.json()["detail"], r.text
    r = secured.post(
        "/datasets", files={"file": ("ok.tsv", TINY_TSV.encode())}, data={"name": ".."}
    )
    assert r.status_code == 201, r.text
    after = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert [str(p) for p in after if p not in before] == [f"datasets/{r.json()['id']}.tsv"]
    assert not (secured.stack.root.parent / "evil.tsv").exists()
    assert consistency_problems(secured.stack) == []


# --------------------------------------------------------------------------- sizes


def _raw_post(url: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    """Send only the headers (and ``body``) and read the answer: no full body is needed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.decode(errors="replace")


def test_oversized_bodies_are_refused_before_they_are_read(secured: Secured) -> None:
    api = secured.stack.api_url
    key = {"X-API-Key": API_KEY}
    started = time.monotonic()
    status, text = _raw_post(
        api,
        "/datasets",
        {**key, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": "1000000000"},
    )
    assert status == 413 and "limit" in text, text
    status, text = _raw_post(
        api, "/jobs", {**key, "Content-Type": "application/json", "Content-Length": "10000000"}
    )
    assert status == 413, text
    status, text = _raw_post(
        secured.inference,
        "/predict",
        {
            "X-API-Key": PREDICT_KEY,
            "Content-Type": "application/json",
            "Content-Length": "10000000",
        },
    )
    assert status == 413, text
    assert time.monotonic() - started < 10  # answered without waiting for the bodies

    # Without a Content-Length (chunked), the body is cut off once past the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"kind": "evaluate", "params": {"x": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}}'

    r = secured.stack.http.post(
        "/jobs", content=chunks(), headers={**key, "Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text
    # A file over the upload limit, with a truthful Content-Length.
    big = TINY_TSV.encode() + b"".join(f"{i}\t很好\t1\n".encode() for i in range(6, 2000))
    r = secured.post("/datasets", files={"file": ("big.tsv", big)})
    assert r.status_code == 413, r.text
    assert secured.stack.http.get("/health").status_code == 200


# --------------------------------------------------------------------------- fuzzing


def _schemathesis(url: str, headers: list[str], max_examples: int, tmp: Path) -> None:
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(exe),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "20240601",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--workers",
        "2",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp),
    ]
    for header in headers:
        cmd += ["-H", header]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "not_a_server_error" in out or "passed" in out.lower(), out[-3000:]


def test_fuzz_control_plane_no_server_errors(secured: Secured, tmp_path: Path) -> None:
    _schemathesis(secured.stack.api_url, [f"X-API-Key: {API_KEY}"], 12, tmp_path)
    assert secured.stack.http.get("/health").status_code == 200


def test_fuzz_inference_no_server_errors(secured: Secured, tmp_path: Path) -> None:
    _schemathesis(secured.inference, [f"X-API-Key: {PREDICT_KEY}"], 40, tmp_path)
    r = httpx.post(
        f"{secured.inference}/predict", json={"text": "很好"}, headers={"X-API-Key": PREDICT_KEY}
    )
    assert r.status_code == 200, r.text
