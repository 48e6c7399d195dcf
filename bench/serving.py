"""Serving benchmark: the inference worker against a hand-written server and the model alone.

Two model shapes, each served by every variant in the same run:

* **chain** — the int8 student of the cached compression chain
  (:mod:`bench.chain`; the demo's recipe: ``default``, or ``quick`` with
  ``--quick``);
* **rbt3** — an hfl/rbt3-shape model (3 layers, hidden 768, 12 heads, FFN
  3072, ``max_length`` 64) with random weights (speed only), exported with
  :func:`pipeline.export.export_onnx` and quantized with
  :func:`pipeline.quantize.quantize_int8`.

Variants:

* **worker** — ``deploy.inference`` as a real uvicorn process
  (:func:`launch.services.inference_command`) on its own database where the
  model is promoted, default settings;
* **worker-unbounded** — the same with the fairness bound off
  (``TEXTCLS_BATCH_MAX_QUEUE_MS`` = 10⁹: the cheapest length group of the
  queue always goes next and is answered on its own, the policy before batches
  were cut from the oldest text): what the bound costs or gains;
* optional **worker-alt** — the worker with the settings of ``--alt-env``:
  an ablation of one setting in the same run;
* **handwritten** — :func:`bench.baseline_server.create_handwritten_app`:
  FastAPI + onnxruntime on the same ``model.onnx``, no batching, Starlette's
  thread pool;
* optional **seed** — :func:`bench.baseline_server.create_app`: what the
  seed's ``deploy/`` did (the PyTorch fp32 model, one request at a time,
  inputs padded to ``max_length``); for the chain shape it serves the teacher;
* **in-process limit** — the model alone in this process (tokenize +
  ``session.run`` via :mod:`pipeline.runtime`) on the same sentences in
  length-sorted batches of 32, same threads: what the cores can do with no
  HTTP at all (the issue's target is against this row);
* **in-process, arrival order** — the same, but batches of 32 in the order
  the load sends them, each cut into the worker's length groups
  (:func:`deploy.batcher.by_length`): the most a server answering 32 random
  requests at a time can do, since it cannot sort sentences it has not
  received yet.

Load: ``wrk`` (installed with apt-get when missing), closed loop, with
``bench/wrk_predict.lua`` posting a different held-out sentence per request
and reporting p50/p99 from wrk's latency distribution. Every cell is a warm-up
run then a measured run; rounds interleave variants and the limit (rotating
their order); tables show medians over rounds, and every target is a ratio of
figures from this one run.

``python -m bench.serving [--quick] [--json FILE] [--markdown FILE]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.chain import PRESETS, Chain, add_chain_arguments, build_chain
from bench.common import environment, median, report, rotated, setup_logging, spread
from bench.loadgen import predict_bodies
from bench.stackutil import BenchStack, bench_stack, prometheus_values, wait_healthy
from deploy.batcher import CALL_OVERHEAD_TOKENS, by_length
from deploy.inference import model_calls_in_flight
from launch.procs import free_port
from launch.services import inference_command, python
from textcls.client import wait_ready

log = logging.getLogger(__name__)

SHAPES = ("chain", "rbt3")
VARIANTS = ("worker", "worker-unbounded", "worker-alt", "handwritten", "seed")
LIMIT = "in-process limit"
ARRIVAL = "arrival"
PARALLEL = "parallel"
WRK_SCRIPT = Path(__file__).with_name("wrk_predict.lua")
# The fairness bound "off": no text is ever overdue.
UNBOUNDED_QUEUE_MS = "1000000000"
RBT3 = {
    "num_hidden_layers": 3,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
RBT3_MAX_LENGTH = 64
LIMIT_BATCH = 32
# The targets, at c=32 unless named.
P99_OVER_P50 = 2.0
RPS_OVER_LIMIT = 0.95
RPS_OVER_HANDWRITTEN = 1.2


# --------------------------------------------------------------------------- setup


def ensure_wrk() -> str:
    """The ``wrk`` binary; installed with apt-get (Debian's package) when missing and root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("installing wrk with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench.serving needs wrk: apt-get install wrk (Debian/Ubuntu)")
    return found


def build_rbt3(chain: Chain, workdir: Path) -> Path:
    """An int8 rbt3-shape model with random weights and the chain's vocabulary (cached)."""
    root = Path(workdir).resolve() / f"rbt3-{chain.root.name}"
    int8 = root / "int8"
    if (int8 / "textcls.json").is_file():
        return int8
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.export import export_onnx
    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import load_tokenizer
    from pipeline.quantize import quantize_int8

    log.info("building an untrained rbt3-shape int8 model in %s (speed only)", root)
    tok = load_tokenizer(chain.folder("teacher"))
    config = scratch_config("base", len(tok), 2, RBT3_MAX_LENGTH)
    for key, value in RBT3.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    meta = ModelMeta(
        format="pytorch",
        max_length=RBT3_MAX_LENGTH,
        num_labels=2,
        extra={"untrained": True, "shape": "rbt3 (3 x 768)"},
    )
    save_model_folder(model, tok, root / "pytorch", meta)
    export_onnx(root / "pytorch", root / "onnx")
    # Random weights give near-tied logits, so label agreement means nothing here.
    quantize_int8(root / "onnx", int8, min_agreement=0.0)
    return int8


def start_servers(
    models: dict[str, Path],
    seed_models: dict[str, Path],
    variants: Sequence[str],
    root: Path,
    threads: int,
    stack: Any,
    alt_env: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Start every (shape, variant) server; returns ``"shape/variant"`` -> {url, pid, ...}."""
    from pipeline.contract import ModelMeta
    from textcls.db import migrate

    servers: dict[str, dict[str, Any]] = {}
    for shape, folder in models.items():
        num_labels = ModelMeta.load(folder).num_labels
        for name in variants:
            key, port = f"{shape}/{name}", free_port()
            info: dict[str, Any] = {
                "shape": shape,
                "variant": name,
                "url": f"http://127.0.0.1:{port}",
                "model_id": None,
            }
            if name in ("handwritten", "seed"):
                served = folder if name == "handwritten" else seed_models[shape]
                args = [python(), "-m", "bench.baseline_server", "--model", str(served),
                        "--port", str(port), "--threads", str(threads)]  # fmt: skip
                if name == "handwritten":
                    args.append("--onnx")
                env = {**stack.env, "OMP_NUM_THREADS": str(threads)}
                info["pid"] = stack.group.start(key.replace("/", "-"), args, env).popen.pid
                servers[key] = info
                continue
            # Each worker has its own database and artifact folder.
            sub_root = root / shape / name
            sub_root.mkdir(parents=True, exist_ok=True)
            db = f"sqlite:///{sub_root / 'textcls.db'}"
            migrate(db)
            sub = BenchStack(sub_root, db, stack.broker_url, stack.group, stack.env)
            model_id = sub.register_model(
                folder, fmt="onnx-int8", name=f"bench-{shape}", num_labels=num_labels
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
            if name == "worker-unbounded":
                env["TEXTCLS_BATCH_MAX_QUEUE_MS"] = UNBOUNDED_QUEUE_MS
            if name == "worker-alt":
                env.update(alt_env or {})
            command = inference_command("127.0.0.1", port)
            info["pid"] = stack.group.start(key.replace("/", "-"), command, env).popen.pid
            info["model_id"] = model_id
            info["settings"] = {
                k: v
                for k, v in env.items()
                if k.startswith("TEXTCLS_BATCH") or k in (alt_env or {})
            }
            servers[key] = info
    for key, info in servers.items():
        wait_healthy(info["url"], timeout=180)
        if info["model_id"] is not None:
            wait_ready(info["url"], info["model_id"], timeout=180)
        log.info("%s ready at %s", key, info["url"])
    return servers


# --------------------------------------------------------------------------- load


def run_wrk(
    wrk: str, url: str, bodies_file: Path, *, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One closed-loop wrk run against ``url``/predict; req/s, p50/p99 and errors."""
    threads = max(1, min(2, concurrency))
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        f"{url}/predict",
        "--",
        str(bodies_file),
    ]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu_s = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    match = re.search(r"^WRKJSON (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    raw = json.loads(match.group(1))
    lat = raw["latency_us"]
    seconds = raw["duration_us"] / 1e6
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": lat["p50"] / 1000.0,
        "p90_ms": lat["p90"] / 1000.0,
        "p99_ms": lat["p99"] / 1000.0,
        "max_ms": lat["max"] / 1000.0,
        "errors": int(sum(raw["errors"].values())),
        "error_kinds": raw["errors"],
        # Cores wrk itself used: on 2 shared cores, what the server could not.
        "wrk_cores": wrk_cpu_s / seconds if seconds else 0.0,
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Texts per model call and mean queue age over a run, from the worker's /metrics."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    calls = delta("textcls_batch_size_count")
    texts = delta("textcls_batch_queue_age_seconds_count")
    return {
        "model_calls": calls,
        "mean_batch_texts": delta("textcls_batch_size_sum") / calls if calls else 0.0,
        "mean_queue_ms": 1000.0 * delta("textcls_batch_queue_age_seconds_sum") / texts
        if texts
        else 0.0,
        "model_threads": after.get("textcls_batch_model_threads", 0.0),
    }


class Limit:
    """The model alone in this process on batches of 32 (same threads, tokenization included).

    ``arrival=False``: the sentences sorted by token count (exact, from the
    model's tokenizer; on the 400 benchmark sentences, batches sorted by
    characters held 14% (chain) and 9% (rbt3) more padded tokens, and that
    row ran slower than the arrival-order one),
    the least padding any batching can reach. ``arrival=True``: batches of 32 in the order the load
    generator sends them, each cut into length groups as the worker cuts them.
    """

    def __init__(
        self, folder: Path, texts: list[str], threads: int, arrival: bool, calls: int = 1
    ) -> None:
        from pipeline.runtime import load_predictor

        self.parallel = calls
        self.predictor = load_predictor(folder, device="cpu", threads=threads)
        if arrival:
            ordered = list(texts)
        else:
            counts = self.predictor.token_lengths(texts)
            ordered = [t for _, t in sorted(zip(counts, texts, strict=True), key=lambda x: x[0])]
        batches = [ordered[i : i + LIMIT_BATCH] for i in range(0, len(ordered), LIMIT_BATCH)]
        self.calls = [g for b in batches for g in self._groups(b, arrival)]
        self.predictor.predict(self.calls[0])  # first call pays for lazy initialisation

    def _groups(self, batch: list[str], arrival: bool) -> list[list[str]]:
        if not arrival:
            return [batch]
        # Exact token counts, as the worker groups the texts it tokenized on arrival.
        lengths = self.predictor.token_lengths(batch)
        groups = by_length(range(len(batch)), lengths, LIMIT_BATCH, CALL_OVERHEAD_TOKENS)
        return [[batch[i] for i in g] for g in groups]

    def run(self, seconds: float) -> dict[str, Any]:
        """Texts per second over ``seconds``, ``parallel`` calls at a time (one thread each)."""
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()

        def loop(offset: int) -> int:
            done = 0
            while time.perf_counter() - started < seconds:
                for k in range(len(self.calls)):
                    call = self.calls[(k + offset) % len(self.calls)]
                    self.predictor.predict(call)
                    done += len(call)
            return done

        with ThreadPoolExecutor(self.parallel) as pool:
            step = len(self.calls) // self.parallel
            done = sum(pool.map(loop, [i * step for i in range(self.parallel)]))
        elapsed = time.perf_counter() - started
        return {"rps": done / elapsed, "texts": done, "seconds": elapsed}


def run_load(
    wrk: str,
    servers: dict[str, dict[str, Any]],
    limits: dict[str, Limit],
    bodies_file: Path,
    *,
    concurrencies: Sequence[int],
    rounds: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """Every server at every concurrency, and each shape's limit, interleaved; per-round rows."""
    load: dict[str, dict[int, list[dict[str, Any]]]] = {
        k: {c: [] for c in concurrencies} for k in servers
    }
    limit_rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in limits}
    keys = list(servers)
    for r in range(rounds):
        for shape in rotated(list(limits), r):
            limit_rounds[shape].append(limits[shape].run(duration_s))
            log.info(
                "round %d %s in-process limit %.1f sent/s",
                r + 1,
                shape,
                limit_rounds[shape][-1]["rps"],
            )
        for ci, c in enumerate(concurrencies):
            for key in rotated(keys, r + ci):
                url = servers[key]["url"]
                is_worker = servers[key]["model_id"] is not None
                run_wrk(wrk, url, bodies_file, concurrency=c, duration_s=warmup_s)
                before = prometheus_values(url) if is_worker else {}
                cpu_before, started = process_cpu_s(servers[key]["pid"]), time.monotonic()
                row = run_wrk(wrk, url, bodies_file, concurrency=c, duration_s=duration_s)
                row["server_cores"] = (process_cpu_s(servers[key]["pid"]) - cpu_before) / (
                    time.monotonic() - started
                )
                if is_worker:
                    row["server"] = _server_side(before, prometheus_values(url))
                load[key][c].append(row)
                log.info(
                    "round %d c=%-3d %-24s %7.1f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d",
                    r + 1,
                    c,
                    key,
                    row["rps"],
                    row["p50_ms"],
                    row["p99_ms"],
                    row["errors"],
                )
    return {"load": load, "limit": limit_rounds}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    load: dict[str, dict[int, dict[str, Any]]] = {}
    for key, by_c in raw["load"].items():
        load[key] = {}
        for c, runs in by_c.items():
            rps = [r["rps"] for r in runs]
            servers = [r["server"] for r in runs if "server" in r]
            load[key][c] = {
                "rps": median(rps),
                "rps_rounds": [round(x, 1) for x in rps],
                "rps_spread": spread(rps),
                "p50_ms": median(r["p50_ms"] for r in runs),
                "p99_ms": median(r["p99_ms"] for r in runs),
                "p99_over_p50_rounds": [round(r["p99_ms"] / r["p50_ms"], 2) for r in runs],
                "errors": int(sum(r["errors"] for r in runs)),
                "requests": int(sum(r["requests"] for r in runs)),
                "mean_batch_texts": median(s["mean_batch_texts"] for s in servers)
                if servers
                else None,
                "mean_queue_ms": median(s["mean_queue_ms"] for s in servers) if servers else None,
                "server_cores": median(r.get("server_cores", 0.0) for r in runs),
                "wrk_cores": median(r.get("wrk_cores", 0.0) for r in runs),
            }
    limit = {
        shape: {"rps": median(r["rps"] for r in runs), "rps_rounds": [r["rps"] for r in runs]}
        for shape, runs in raw["limit"].items()
    }
    return {"load": load, "limit": limit}


# --------------------------------------------------------------------------- targets


def _cell(result: dict[str, Any], key: str, c: int) -> dict[str, Any] | None:
    by_c = result["summary"]["load"].get(key)
    if by_c is None:
        return None
    cell = by_c.get(str(c), by_c.get(c))
    return dict(cell) if cell else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the shipped worker, per shape, each a ratio within this run."""
    out: list[dict[str, Any]] = []
    cs = result["config"]["concurrency"]
    mid, low = (32 if 32 in cs else max(cs)), min(cs)
    for shape in result["config"]["shapes"]:
        w = _cell(result, f"{shape}/worker", mid)
        h = _cell(result, f"{shape}/handwritten", mid)
        limit = result["summary"]["limit"].get(shape, {}).get("rps")
        if w is None:
            continue

        def add(target: str, met: bool, measured: str, shape: str = shape) -> None:
            out.append({"shape": shape, "target": target, "measured": measured, "met": met})

        r = w["p99_ms"] / w["p50_ms"]
        add(
            f"c={mid} p99 <= {P99_OVER_P50:g} x p50",
            r <= P99_OVER_P50,
            f"{w['p99_ms']:.1f} / {w['p50_ms']:.1f} ms = x{r:.2f}",
        )
        if h is not None:
            r = w["p99_ms"] / h["p99_ms"]
            add(
                f"c={mid} p99 <= handwritten's",
                r <= 1.0,
                f"{w['p99_ms']:.1f} vs {h['p99_ms']:.1f} ms = x{r:.2f}",
            )
        if limit:
            r = w["rps"] / limit
            add(
                f"c={mid} req/s >= {RPS_OVER_LIMIT:g} x in-process limit",
                r >= RPS_OVER_LIMIT,
                f"{w['rps']:.0f} vs {limit:.0f} = x{r:.2f}",
            )
        for suffix, what in ((ARRIVAL, "arrival order"), (PARALLEL, "calls at once")):
            other = result["summary"]["limit"].get(f"{shape}/{suffix}", {}).get("rps")
            if other:
                r = w["rps"] / other
                out.append(
                    {
                        "shape": shape,
                        "target": f"(not a target) c={mid} req/s / in-process, {what}",
                        "measured": f"{w['rps']:.0f} vs {other:.0f} = x{r:.2f}",
                        "met": None,
                    }
                )
        if h is not None:
            r = w["rps"] / h["rps"]
            add(
                f"c={mid} req/s >= {RPS_OVER_HANDWRITTEN:g} x handwritten",
                r >= RPS_OVER_HANDWRITTEN,
                f"{w['rps']:.0f} vs {h['rps']:.0f} = x{r:.2f}",
            )
        w1, h1 = _cell(result, f"{shape}/worker", low), _cell(result, f"{shape}/handwritten", low)
        if w1 is not None and h1 is not None:
            r = w1["p50_ms"] / h1["p50_ms"]
            add(
                f"c={low} p50 <= handwritten's",
                r <= 1.0,
                f"{w1['p50_ms']:.2f} vs {h1['p50_ms']:.2f} ms = x{r:.2f}",
            )
        errors = sum((_cell(result, f"{shape}/worker", c) or {}).get("errors", 0) for c in cs)
        add(f"0 errors at c = {', '.join(map(str, cs))}", errors == 0, str(errors))
    return out


# --------------------------------------------------------------------------- report


def _per_server(
    title: str, result: dict[str, Any], keys: list[str], fields: list[tuple[str, str]]
) -> tuple[str, list[str], list[list[Any]]]:
    """A table of ``keys`` (shape/server) by each (label, field) at every concurrency."""
    cs = result["config"]["concurrency"]
    cols = ["shape", "server"] + [f"c={c} {label}" for label, _ in fields for c in cs]
    rows = []
    for key in keys:
        cells = [_cell(result, key, c) or {} for c in cs]
        rows.append(key.split("/") + [x.get(field) for _, field in fields for x in cells])
    return title, cols, rows


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    cs = result["config"]["concurrency"]
    calls = result["config"].get("limit_parallel_calls", 1)
    out: list[tuple[str, list[str], list[list[Any]]]] = []
    cols = ["shape", "server"]
    for c in cs:
        cols += [f"c={c} req/s", f"c={c} p50 ms", f"c={c} p99 ms"]
    cols += ["errors"]
    rows: list[list[Any]] = []
    for shape in result["config"]["shapes"]:
        for name in result["config"]["variants"]:
            key = f"{shape}/{name}"
            if key not in result["summary"]["load"]:
                continue
            row: list[Any] = [shape, name]
            errors = 0
            for c in cs:
                cell = _cell(result, key, c) or {}
                row += [cell.get("rps"), cell.get("p50_ms"), cell.get("p99_ms")]
                errors += int(cell.get("errors", 0))
            rows.append([*row, errors])
        names = {
            shape: f"length-sorted batches of {LIMIT_BATCH}",
            f"{shape}/{ARRIVAL}": f"arrival-order batches of {LIMIT_BATCH}",
            f"{shape}/{PARALLEL}": f"length-sorted batches of {LIMIT_BATCH}, {calls} calls at once",
        }
        for key, how in names.items():
            limit = result["summary"]["limit"].get(key)
            if limit:
                rows.append(
                    [shape, f"{LIMIT} ({how})"] + [limit["rps"], None, None] * len(cs) + [None]
                )
    out.append(
        (f"serving: wrk closed loop, median of {result['config']['rounds']} rounds", cols, rows)
    )

    workers = [k for k in result["summary"]["load"] if k.split("/")[1].startswith("worker")]
    internals = [("texts/call", "mean_batch_texts"), ("mean queue ms", "mean_queue_ms")]
    out.append(_per_server("worker internals (from its /metrics)", result, workers, internals))
    cores = [("server cores", "server_cores"), ("wrk cores", "wrk_cores")]
    title = "CPU used (cores, of the machine's 2; /proc and getrusage)"
    out.append(_per_server(title, result, list(result["summary"]["load"]), cores))

    fcols = ["shape"] + [f"c={c} req/s bounded / unbounded" for c in cs]
    fcols += [f"c={c} p99 bounded / unbounded" for c in cs]
    frows = []
    for shape in result["config"]["shapes"]:
        pairs = [
            (_cell(result, f"{shape}/worker", c), _cell(result, f"{shape}/worker-unbounded", c))
            for c in cs
        ]
        if not all(a and b for a, b in pairs):
            continue
        frows.append(
            [shape]
            + [f"x{a['rps'] / b['rps']:.2f}" for a, b in pairs if a and b]
            + [f"x{a['p99_ms'] / b['p99_ms']:.2f}" for a, b in pairs if a and b]
        )
    if frows:
        out.append(("the fairness bound's cost: worker / worker-unbounded", fcols, frows))
    out.append(
        (
            "serving targets (ratios within this run)",
            ["shape", "target", "measured", "met"],
            [[t["shape"], t["target"], t["measured"], t["met"]] for t in result["targets"]],
        )
    )
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run (a minute or so, cached)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    add_chain_arguments(p)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--concurrency", nargs="+", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per cell")
    p.add_argument("--sentences", type=int, default=400, help="held-out sentences to cycle")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of every server's model and of the in-process limit (default 1: "
        "on two shared cores the HTTP event loop and wrk need the other core)",
    )
    p.add_argument(
        "--alt-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="settings of the worker-alt variant (an ablation: the worker with these set)",
    )
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    quick = args.quick
    default_variants = ["worker", "worker-unbounded", "handwritten"]
    variants = args.variants or (["worker", "handwritten"] if quick else default_variants)
    concurrency = args.concurrency or ([1, 32] if quick else [1, 8, 32, 64])
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (2.0 if quick else 4.0)
    warmup = args.warmup if args.warmup is not None else 1.0
    wrk = ensure_wrk()

    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "serving", "environment": environment()}
    chain = build_chain(
        PRESETS[args.chain or ("quick" if quick else "default")],
        args.workdir,
        # The rbt3 shape needs only the chain's vocabulary and held-out sentences.
        steps=["teacher", "int8"] if "chain" in args.shapes else ["teacher"],
        rebuild=args.rebuild,
        threads=args.train_threads,
    )
    models: dict[str, Path] = {}
    seed_models: dict[str, Path] = {}
    if "chain" in args.shapes:
        models["chain"] = chain.folder("int8")
        seed_models["chain"] = chain.folder("teacher")
    if "rbt3" in args.shapes:
        models["rbt3"] = build_rbt3(chain, args.workdir)
        seed_models["rbt3"] = models["rbt3"].parent / "pytorch"
    from pipeline.data import read_tsv

    texts = read_tsv(chain.test).texts[: args.sentences]
    result["config"] = {
        "quick": quick,
        "shapes": list(models),
        "models": {k: str(v) for k, v in models.items()},
        "variants": variants,
        "concurrency": concurrency,
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "threads": threads_note(args.threads),
        "load_generator": "wrk (bench/wrk_predict.lua), closed loop, 1-2 wrk threads",
        "sentences": len(texts),
        "sentence_chars_p50": float(np.median([len(t) for t in texts])),
        "chain": chain.describe(),
    }
    run_root = Path(args.workdir).resolve() / "runs" / f"serving-{int(time.time())}"
    bodies_file = run_root / "bodies.jsonl"
    run_root.mkdir(parents=True, exist_ok=True)
    bodies_file.write_bytes(b"\n".join(predict_bodies(texts)) + b"\n")
    limits: dict[str, Limit] = {}
    # As many calls at once as the worker's automatic TEXTCLS_BATCH_CONCURRENCY runs.
    calls = model_calls_in_flight(0, "cpu", args.threads)
    result["config"]["limit_parallel_calls"] = calls
    for shape, folder in models.items():
        limits[shape] = Limit(folder, texts, args.threads, arrival=False)
        limits[f"{shape}/{ARRIVAL}"] = Limit(folder, texts, args.threads, arrival=True)
        if calls > 1:
            limits[f"{shape}/{PARALLEL}"] = Limit(folder, texts, args.threads, False, calls)
    result["loadavg_start"] = os.getloadavg()
    with bench_stack(run_root, f"sqlite:///{run_root / 'textcls.db'}") as stack:
        alt_env = dict(kv.split("=", 1) for kv in args.alt_env)
        result["config"]["alt_env"] = alt_env
        servers = start_servers(
            models, seed_models, variants, run_root, args.threads, stack, alt_env
        )
        result["servers"] = servers
        raw = run_load(
            wrk,
            servers,
            limits,
            bodies_file,
            concurrencies=concurrency,
            rounds=rounds,
            warmup_s=warmup,
            duration_s=duration,
        )
    result["loadavg_end"] = os.getloadavg()
    result["rounds_raw"] = raw
    result["summary"] = summarize(raw)
    result["targets"] = targets(json.loads(json.dumps(result, default=str)))
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


def threads_note(threads: int) -> dict[str, Any]:
    return {"intra_op": threads, "cores": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
