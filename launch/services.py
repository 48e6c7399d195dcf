"""The one definition of each service's command line.

Each function returns the argv that runs one service process. Everything that
starts a service uses it:

- the CLI: ``textcls api``, ``textcls worker`` and ``textcls inference`` build
  the argv here from their options and exec it (:func:`launch.cli.main`), so
  ``docker-compose.yml``, whose services run those ``textcls`` commands, runs
  exactly these lines (``tests/test_compose.py`` checks it);
- the embedded stack (``textcls up``, ``textcls demo``: :mod:`launch.embedded`);
- the tests (``tests/stack.py``, ``tests/reliability``) and the benchmarks
  (``bench/``), which start the same argv directly.

The services are named by module path only (``api.main``, ``workers.tasks``,
``deploy.inference``): building a command line imports none of them.
"""

from __future__ import annotations

import sys

API_APP = "api.main:app_factory"
INFERENCE_APP = "deploy.inference:app_factory"
# The module that registers the job task on the Celery app; Celery finds the
# app in it (``-A`` with a module name).
CELERY_APP = "workers.tasks"
DEFAULT_QUEUES = "gpu,cpu"

# Every worker runs with these flags. Gossip (each worker subscribing to every
# other worker's events) and mingle (a startup round in which a new worker asks
# the others for their revoked tasks and logical clock) are worker-to-worker
# chatter over Redis that nothing here uses: job state, cancellation included,
# lives in the database, and a revoke is only a best-effort extra for a queued
# job that the worker skips anyway. Without them a worker starts faster (no
# mingle wait) and N workers do not cost N^2 event traffic. Remote control
# (``celery inspect ping``, the compose health check) and Flower's inspection
# use the broadcast mailbox, which stays on.
WORKER_FLAGS = ("--without-gossip", "--without-mingle")
WORKER_LOG_LEVEL = "INFO"  # the worker's "ready" line, which tests wait for, is INFO
# uvicorn's level when the caller names none: the embedded stack, the tests and
# the benchmarks keep logs in files (tailed when something fails) and measure
# latency, so no access log line per request. ``textcls api``/``inference``
# pass their ``--log-level`` option, which defaults to info (compose logs).
QUIET_LOG_LEVEL = "warning"


def python() -> str:
    """The interpreter every service runs with: this one (the same virtualenv)."""
    return sys.executable


def _uvicorn_command(factory: str, host: str, port: int, log_level: str) -> list[str]:
    return [
        *(python(), "-m", "uvicorn", "--factory", factory),
        *("--host", host, "--port", str(port), "--log-level", log_level),
    ]


def api_command(host: str, port: int, log_level: str = QUIET_LOG_LEVEL) -> list[str]:
    """The control plane (FastAPI under uvicorn). No migration: run ``textcls migrate``."""
    return _uvicorn_command(API_APP, host, port, log_level)


def inference_command(host: str, port: int, log_level: str = QUIET_LOG_LEVEL) -> list[str]:
    """An inference worker serving the promoted model."""
    return _uvicorn_command(INFERENCE_APP, host, port, log_level)


def worker_command(
    queues: str = DEFAULT_QUEUES, name: str = "worker", concurrency: int = 1
) -> list[str]:
    """A Celery worker on ``queues`` (comma-separated), node name ``name@<host>``."""
    return [
        *(python(), "-m", "celery", "-A", CELERY_APP, "worker"),
        *("-Q", queues, "-c", str(concurrency), "-n", f"{name}@%h"),
        *("--loglevel", WORKER_LOG_LEVEL, *WORKER_FLAGS),
    ]
