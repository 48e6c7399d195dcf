"""Fault: the Redis broker restarts (losing every queued message) while jobs wait and run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.deploy.helpers import register_model
from tests.reliability.helpers import OwnRedis, consistency_problems, job_starts, wait_all_final
from tests.stack import Stack


def test_redis_restart_loses_no_job(own_redis: OwnRedis, tiny_model: Path, tiny_tsv: Path) -> None:
    root = Path(tempfile.mkdtemp(dir=own_redis.data_dir.parent))
    stack = Stack(
        root,
        f"sqlite:///{root / 'textcls.db'}",
        own_redis.url,
        requeue_lost_after=3,
    )
    try:
        stack.start_api()
        stack.start_worker()
        model_id = register_model(stack, tiny_model, name="tiny")
        ds = stack.upload(tiny_tsv)
        # One job long enough to be running across the restart, three queued behind it.
        long = stack.submit("evaluate", model_id=model_id, dataset_id=ds["id"], latency_runs=1500)
        stack.wait_job(long["id"], {"running"}, timeout=60)
        quick = [
            stack.submit("evaluate", model_id=model_id, dataset_id=ds["id"], latency_runs=5)
            for _ in range(3)
        ]
        assert all(stack.job(j["id"])["status"] == "queued" for j in quick)

        own_redis.restart()
        assert stack.job(long["id"])["status"] == "running"

        ids = [long["id"], *(j["id"] for j in quick)]
        done = wait_all_final(stack, ids, timeout=120)
        assert [j["status"] for j in done] == ["succeeded"] * 4, (done, stack.logs())
        assert all(j["attempt"] == 0 for j in done), done
        # Each job ran exactly once: the re-sent messages never ran a job twice.
        starts = job_starts(stack)
        assert {i: starts.get(i) for i in ids} == dict.fromkeys(ids, 1), starts
        # The queued messages were lost with the old Redis and sent again by the reaper.
        api_log = (root / "logs" / "api.log").read_text(errors="replace")
        resent = {j["id"] for j in quick if f"job {j['id']} (attempt 0) was queued" in api_log}
        assert resent, api_log[-3000:]
        assert consistency_problems(stack) == []
        # The control plane works on the new Redis: a fresh job runs too.
        after = stack.submit("evaluate", model_id=model_id, dataset_id=ds["id"], latency_runs=5)
        assert stack.wait_job(after["id"], timeout=60)["status"] == "succeeded"
    finally:
        stack.close()
