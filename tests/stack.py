"""A real textcls stack for tests: database, Redis, API and worker processes."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from launch.procs import Proc, ProcessGroup, free_port, wait_for
from launch.services import api_command, inference_command, worker_command
from textcls.db import migrate

REPO = Path(__file__).resolve().parents[1]
FINAL = {"succeeded", "failed", "cancelled"}
_redis_db = itertools.count(1)
# Redis database numbers a stack may use; 13 belongs to the lost-message test.
STACK_DBS = [i for i in range(1, 16) if i != 13]
CLAIM_SECONDS = 3600


def claim_redis_db(redis_base: str) -> tuple[int, str | None]:
    """A Redis database number no other live stack uses, across test processes.

    Two pytest runs on one Redis (developers running files side by side) would
    otherwise number their stacks alike, and one run's workers would take the
    other's job messages. A claim is a key in database 0 that expires.
    """
    import redis

    client = redis.Redis.from_url(f"{redis_base.rstrip('/').rsplit('/', 1)[0]}/0")
    token = uuid.uuid4().hex
    start = next(_redis_db)
    for k in range(len(STACK_DBS)):
        db = STACK_DBS[(start + k) % len(STACK_DBS)]
        if client.set(f"textcls:test-db:{db}", token, nx=True, ex=CLAIM_SECONDS):
            return db, token
    return STACK_DBS[start % len(STACK_DBS)], None  # all claimed: share one


def release_redis_db(redis_base: str, db: int, token: str | None) -> None:
    import redis

    if token is None:
        return
    client = redis.Redis.from_url(f"{redis_base.rstrip('/').rsplit('/', 1)[0]}/0")
    key = f"textcls:test-db:{db}"
    if client.get(key) == token.encode():
        client.delete(key)


def create_pg_database(server_url: str) -> str:
    """A fresh, empty database on the server; returns its SQLAlchemy URL."""
    import psycopg

    name = f"textcls_{uuid.uuid4().hex[:12]}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


class Stack:
    """Processes of one isolated textcls deployment (own database, Redis db, folder)."""

    def __init__(self, root: Path, database_url: str, redis_base: str, **settings: Any) -> None:
        self.root = root
        self.database_url = database_url
        self._redis_base = redis_base
        db_index, self._redis_claim = claim_redis_db(redis_base)
        self._redis_db_index = db_index
        self.broker_url = f"{redis_base.rstrip('/').rsplit('/', 1)[0]}/{db_index}"
        import redis

        redis.Redis.from_url(self.broker_url).flushdb()
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            "TEXTCLS_DATA_DIR": str(root),
            "TEXTCLS_DATABASE_URL": database_url,
            "TEXTCLS_BROKER_URL": self.broker_url,
            "TEXTCLS_ARTIFACT_DIR": str(root / "artifacts"),
            "TEXTCLS_HEARTBEAT_INTERVAL": "1",
            "TEXTCLS_HEARTBEAT_TIMEOUT": "8",
            "TEXTCLS_REAPER_INTERVAL": "1",
            "TEXTCLS_API_URL": self.api_url,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        self.env.update({f"TEXTCLS_{k.upper()}": str(v) for k, v in settings.items()})
        self.group = ProcessGroup(log_dir=root / "logs")
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        migrate(database_url)
        self.http = httpx.Client(base_url=self.api_url, timeout=30)

    # ------------------------------------------------------------------ processes
    def start_api(self) -> Proc:
        self.api = self.group.start("api", api_command("127.0.0.1", self.api_port), self.env)
        wait_for(lambda: self.http.get("/health").status_code == 200, 60, "API")
        return self.api

    def start_worker(self, name: str = "worker", queues: str = "gpu,cpu", **extra_env: str) -> Proc:
        proc = self.group.start(
            f"{name}-{len(self.workers)}", worker_command(queues, name), {**self.env, **extra_env}
        )
        self.workers.append(proc)
        wait_for(lambda: "ready" in proc.tail(200), 90, f"worker {name}")
        return proc

    def start_inference(self, port: int | None = None, **extra_env: str) -> tuple[Proc, str]:
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.group.start(
            f"inference-{port}", inference_command("127.0.0.1", port), {**self.env, **extra_env}
        )
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 90, "inference")
        return proc, url

    def close(self) -> None:
        self.http.close()
        self.group.stop_all()
        release_redis_db(self._redis_base, self._redis_db_index, self._redis_claim)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.group.procs)

    # ------------------------------------------------------------------ API helpers
    def upload(self, path: Path, name: str | None = None) -> dict[str, Any]:
        files = {"file": (path.name, path.read_bytes(), "text/tab-separated-values")}
        r = self.http.post("/datasets", files=files, data={"name": name} if name else None)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def submit(self, kind: str, **params: Any) -> dict[str, Any]:
        r = self.http.post("/jobs", json={"kind": kind, "params": params})
        assert r.status_code == 202, r.text
        return dict(r.json())

    def job(self, job_id: int) -> dict[str, Any]:
        r = self.http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_job(
        self, job_id: int, statuses: set[str] | None = None, timeout: float = 300
    ) -> dict[str, Any]:
        statuses = statuses or FINAL
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.3)
        raise TimeoutError(
            f"job {job_id} still {job.get('status')} after {timeout} s\n{self.logs()}"
        )
