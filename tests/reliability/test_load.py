"""Load: a burst of 1,000 jobs, and a minute of steady prediction traffic."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from launch.services import worker_command
from tests.deploy.helpers import fake_model_folder, register_model, wait_serving
from tests.reliability.helpers import (
    TINY_TEXTS,
    consistency_problems,
    job_starts,
    wait_all_final,
)
from tests.stack import Stack, create_pg_database

BURST = 1000
CLIENTS = 16


@pytest.mark.slow
def test_burst_of_jobs_all_accepted_and_finished(
    tmp_path: Path, pg_server_url: str, redis_url: str, tiny_model: Path, tiny_tsv: Path
) -> None:
    """1,000 jobs from 16 clients at once: all accepted, each run exactly once, all final.

    Every fiftieth job is a real (tiny) evaluation that succeeds (each runs in its
    own killable process, ~1-3 s here); the others ask to
    export an int8 model, which the worker refuses at once (export takes a
    PyTorch model), so the burst goes through the whole path (queue, claim,
    heartbeat, outcome) in the time two cores allow.
    """
    stack = Stack(tmp_path / "stack", create_pg_database(pg_server_url), redis_url)
    try:
        stack.start_api()
        model_id = register_model(stack, tiny_model, name="tiny")
        good = stack.upload(tiny_tsv)["id"]
        int8 = fake_model_folder(tmp_path / "int8", fmt="onnx-int8")
        hollow = register_model(stack, int8, name="int8", fmt="onnx-int8")

        def submit(worker: int) -> list[tuple[int, bool]]:
            out = []
            with httpx.Client(base_url=stack.api_url, timeout=60) as client:
                for n in range(worker, BURST, CLIENTS):
                    real = n % 50 == 0
                    kind, params = (
                        ("evaluate", {"model_id": model_id, "dataset_id": good})
                        if real
                        else ("export", {"model_id": hollow})
                    )
                    r = client.post("/jobs", json={"kind": kind, "params": params})
                    assert r.status_code == 202, r.text
                    out.append((int(r.json()["id"]), real))
            return out

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            jobs = dict(pair for batch in pool.map(submit, range(CLIENTS)) for pair in batch)
        accepted_s = time.monotonic() - started
        assert len(jobs) == BURST
        # One worker process with two pool processes: both cores.
        stack.group.start("worker-burst", worker_command("gpu,cpu", "burst", 2), stack.env)
        done = wait_all_final(stack, sorted(jobs), timeout=300)
        elapsed = time.monotonic() - started
        print(f"\n{BURST} jobs accepted in {accepted_s:.1f} s, all final after {elapsed:.1f} s")
        for job in done:
            if jobs[job["id"]]:
                assert job["status"] == "succeeded", job
                assert job["metrics"]["accuracy"] is not None
            else:
                assert job["status"] == "failed", job
                assert "needs a model of format pytorch" in job["error"], job["error"]
        starts = job_starts(stack)
        assert all(starts.get(i) == 1 for i in jobs), {i: starts.get(i) for i in list(jobs)[:5]}
        evals = stack.http.get(f"/models/{model_id}").json()["evaluations"]
        assert [e["dataset_id"] for e in evals] == [good]
        assert consistency_problems(stack) == []
    finally:
        stack.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_inference_steady_load_for_a_minute(
    tmp_path: Path, redis_url: str, tiny_model: Path
) -> None:
    """Four clients for 60 s: no errors, and memory flat after the warm-up."""
    stack = Stack(tmp_path / "stack", f"sqlite:///{tmp_path / 'stack' / 'db.sqlite'}", redis_url)
    try:
        stack.start_api()
        model_id = register_model(stack, tiny_model, name="tiny")
        assert stack.http.post(f"/models/{model_id}/promote").status_code == 201
        proc, url = stack.start_inference()
        wait_serving(url, model_id)

        errors: list[str] = []
        latencies: list[float] = []
        count = [0]
        stop = threading.Event()
        lock = threading.Lock()

        def client(n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                i = n
                while not stop.is_set():
                    i += 1
                    texts = [
                        TINY_TEXTS[(i + k) % len(TINY_TEXTS)] * (1 + i % 5)
                        for k in range(i % 4 + 1)
                    ]
                    body = {"text": texts[0]} if i % 2 else {"text": texts}
                    t0 = time.perf_counter()
                    try:
                        r = http.post("/predict", json=body)
                        ok = r.status_code == 200 and r.json()["model_id"] == model_id
                        if not ok:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        count[0] += 1

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 60:
            samples.append((elapsed, _rss_kib(proc.popen.pid)))
            time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=30)

        assert errors == [], errors[:5]
        assert count[0] > 500, count[0]
        warm = [rss for t, rss in samples if t >= 15]  # after warm-up
        first, last = statistics.mean(warm[:3]), statistics.mean(warm[-3:])
        growth_mib = (last - first) / 1024
        p99 = sorted(latencies)[int(len(latencies) * 0.99)]
        print(
            f"\n{count[0]} requests in 60 s ({count[0] / 60:.0f}/s), p99 {p99 * 1000:.0f} ms, "
            f"RSS {first / 1024:.0f} -> {last / 1024:.0f} MiB after warm-up"
        )
        assert growth_mib < 25, samples
        assert proc.alive()
        metrics = httpx.get(f"{url}/metrics").text
        assert 'status="500"' not in metrics
    finally:
        stack.close()
