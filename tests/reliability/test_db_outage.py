"""Fault: PostgreSQL goes away for a while under a running stack, then comes back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from tests.deploy.helpers import build_model_folder, register_model, wait_serving
from tests.reliability.helpers import TINY_TSV, consistency_problems, wait_all_final
from tests.reliability.proxy import TcpProxy
from tests.stack import Stack, create_pg_database


def _expect_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert "database unavailable" in response.json()["detail"]
    assert response.headers.get("retry-after")


def test_database_outage_is_survived(
    pg_server_url: str, redis_url: str, tmp_path: Path, tiny_model: Path, tiny_tsv: Path
) -> None:
    real = make_url(create_pg_database(pg_server_url))
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    stack = Stack(tmp_path / "stack", url, redis_url, deployment_poll_interval=1)
    try:
        stack.start_api()
        stack.start_worker()
        _, inference = stack.start_inference()
        a = register_model(stack, tiny_model, name="A")
        assert stack.http.post(f"/models/{a}/promote").status_code == 201
        wait_serving(inference, a)
        ds = stack.upload(tiny_tsv)
        long = stack.submit("evaluate", model_id=a, dataset_id=ds["id"], latency_runs=1200)
        stack.wait_job(long["id"], {"running"}, timeout=60)

        proxy.cut()
        # The control plane answers 503 with the reason, on reads and on writes.
        _expect_503(stack.http.get("/jobs"))
        _expect_503(stack.http.get(f"/jobs/{long['id']}"))
        _expect_503(stack.http.get("/models"))
        body = {"kind": "evaluate", "params": {"model_id": a, "dataset_id": ds["id"]}}
        _expect_503(stack.http.post("/jobs", json=body))
        files = {"file": ("d.tsv", TINY_TSV.encode(), "text/tab-separated-values")}
        _expect_503(stack.http.post("/datasets", files=files))
        assert stack.http.get("/health").status_code == 200
        # The inference worker keeps serving the model it has.
        r = httpx.post(f"{inference}/predict", json={"text": ["很好", "太差"]}, timeout=10)
        assert r.status_code == 200 and r.json()["model_id"] == a, r.text
        time.sleep(3)  # heartbeats and deployment polls fail meanwhile
        assert all(p.alive() for p in stack.group.procs), stack.logs()

        proxy.restore()
        # Each service recovers by itself (pool_pre_ping drops the dead connections).
        deadline = time.monotonic() + 30
        while stack.http.get("/jobs").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert stack.http.get("/jobs").status_code == 200
        assert stack.upload(tiny_tsv)["rows"] == 6
        quick = stack.submit("evaluate", model_id=a, dataset_id=ds["id"], latency_runs=5)
        done = wait_all_final(stack, [long["id"], quick["id"]], timeout=120)
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], (done, stack.logs())
        # The running job rode out the outage: not restarted, not reaped.
        assert done[0]["attempt"] == 0, done[0]
        # The inference worker reads the database again: it follows a new promotion.
        b = register_model(stack, build_model_folder(tmp_path / "b", label=1, seed=1), name="B")
        assert stack.http.post(f"/models/{b}/promote").status_code == 201
        wait_serving(inference, b, timeout=60)
        assert consistency_problems(stack) == []
    finally:
        stack.close()
        proxy.close()
