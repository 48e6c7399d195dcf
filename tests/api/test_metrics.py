"""The control plane's Prometheus metrics (``GET /metrics``) from a real API process:
requests by route template, jobs by kind and status, queue depth, reaper actions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis

from launch.procs import wait_for
from tests.prometheus import sample, scrape
from tests.stack import Stack
from textcls.queue import queue_keys


def test_control_plane_metrics(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    # No worker: submitted jobs wait in the queue. Lost messages are looked for every second.
    stack = make_stack("sqlite", requeue_lost_after=1)
    stack.start_api()
    url = f"{stack.api_url}/metrics"
    data = tmp_path / "tiny.tsv"
    data.write_text(
        "index\tsentence\tlabel\n" + "".join(f"{i}\t第{i}句\t{i % 2}\n" for i in range(8)),
        encoding="utf-8",
    )
    train = stack.upload(data)
    jobs = [
        stack.submit("train", dataset_id=train["id"], base_model="scratch:tiny") for _ in range(3)
    ]
    for job in jobs:
        stack.job(job["id"])
    assert stack.http.get("/no/such/page").status_code == 404
    assert stack.http.get("/jobs/999").status_code == 404

    m = scrape(url)
    total = "textcls_api_requests_total"
    assert sample(m, total, route="/jobs", method="POST", status="202") == 3
    assert sample(m, total, route="/jobs/{job_id}", method="GET", status="200") == 3
    assert sample(m, total, route="/jobs/{job_id}", method="GET", status="404") == 1
    assert sample(m, total, route="/datasets", method="POST", status="201") == 1
    assert sample(m, total, route="unmatched", method="GET", status="404") == 1
    count = "textcls_api_request_latency_seconds_count"
    assert sample(m, count, route="/jobs/{job_id}", method="GET") == 4
    assert sample(m, "textcls_jobs", kind="train", status="queued") == 3
    assert sample(m, "textcls_jobs", kind="train", status="running") == 0
    assert sample(m, "textcls_queue_depth", queue="gpu") == 3
    assert sample(m, "textcls_queue_depth", queue="cpu") == 0
    assert sample(m, "textcls_metrics_source_up", source="database") == 1
    assert sample(m, "textcls_metrics_source_up", source="broker") == 1

    # The broker loses the messages (as a Redis restart without persistence does):
    # the reaper sends them again, and counts it.
    broker = redis.Redis.from_url(stack.broker_url)
    assert broker.delete(*queue_keys("gpu")) >= 1
    assert sample(scrape(url), "textcls_queue_depth", queue="gpu") == 0

    def resent_all() -> bool:
        m = scrape(url)
        got = sample(
            m, "textcls_reaper_actions_total", sweep="resend_lost_messages", action="resent"
        )
        return got == 3

    wait_for(resent_all, 30, "the reaper to resend three lost messages")
    m = scrape(url)
    assert sample(m, "textcls_queue_depth", queue="gpu") == 3
    assert sample(m, "textcls_jobs", kind="train", status="queued") == 3

    # Cancelled: the gauge follows the database.
    for job in jobs:
        assert stack.http.post(f"/jobs/{job['id']}/cancel").status_code == 200
    m = scrape(url)
    assert sample(m, "textcls_jobs", kind="train", status="cancelled") == 3
    assert sample(m, "textcls_jobs", kind="train", status="queued") == 0
