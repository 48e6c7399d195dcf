"""Which model this inference worker serves, and switching it without a restart.

A watcher thread reads the current deployment from the database at startup,
whenever a Redis pub/sub nudge arrives, and every ``poll_interval`` seconds as
a fallback (a missed message or a Redis restart only delays a switch). A new
model is loaded and warmed up in that thread while the old one keeps serving,
then swapped in with a single reference assignment. Requests pin the model
they start with, so in-flight work finishes on it; the old model is freed when
the last request holding it ends. A model that fails to load leaves the old
one serving, and the error shows in ``/ready``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from textcls.deployments import ServedModel

log = logging.getLogger(__name__)

# (model folder, device, threads) -> a Predictor (see pipeline.runtime)
LoaderFn = Callable[[Path, str, int | None], Any]
TargetFn = Callable[[], ServedModel | None]
PathFn = Callable[[ServedModel], Path]

# Warm-up texts of a few lengths, so the first real requests do not pay for
# lazy initialisation (allocator growth, ONNX Runtime kernel selection).
WARMUP_TEXTS = ["好", "这个东西很好用", "质量一般，物流很慢，客服态度也不好，不会再买了。" * 3]


@dataclass(eq=False)
class LoadedModel:
    """A model ready to serve; requests hold on to the one they started with.

    ``users`` counts requests in flight on it. Once swapped out (``retired``)
    and unused, its predictor is closed so its memory (GPU memory above all)
    goes back at once rather than whenever the last reference disappears.
    """

    model_id: int
    deployment_id: int
    format: str
    predictor: Any
    loaded_at: datetime
    load_seconds: float
    users: int = 0
    retired: bool = False
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> str:
        return str(getattr(self.predictor, "device", "cpu"))

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            close = self.retired and self.users == 0 and not self.closed
            self.closed = self.closed or close
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            close = self.users == 0 and not self.closed
            self.closed = self.closed or close
        if close:
            self._close()

    def _close(self) -> None:
        closer = getattr(self.predictor, "close", None)
        if closer is None:
            return
        try:
            closer()
            log.info("closed model %s (swapped out, no requests left on it)", self.model_id)
        except Exception:
            log.warning("closing model %s failed", self.model_id, exc_info=True)


def default_loader(folder: Path, device: str, threads: int | None) -> Any:
    """Load a model folder with the shared runtime (imported lazily: heavy)."""
    from pipeline.runtime import load_predictor

    return load_predictor(folder, device=device, threads=threads)


class ModelRegistry:
    """Holds the served model and keeps it in step with the database."""

    def __init__(
        self,
        *,
        resolve_target: TargetFn,
        model_path: PathFn,
        loader: LoaderFn = default_loader,
        device: str = "auto",
        threads: int | None = None,
        poll_interval: float = 5.0,
        retry_interval: float = 30.0,
        broker_url: str | None = None,
        channel: str | None = None,
        on_swap: Callable[[LoadedModel], None] | None = None,
        on_load_failure: Callable[[int], None] | None = None,
    ) -> None:
        self._resolve_target = resolve_target
        self._model_path = model_path
        self._loader = loader
        self.device = device
        self.threads = threads
        self.poll_interval = max(0.1, poll_interval)
        self.retry_interval = retry_interval
        self.broker_url = broker_url
        self.channel = channel
        self._on_swap = on_swap
        self._on_load_failure = on_load_failure

        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # What /ready reports besides the current model.
        self.target: ServedModel | None = None
        self.target_known = False  # the database has been read at least once
        self.loading_model_id: int | None = None
        self.last_error: dict[str, Any] | None = None
        self.subscribed = False
        self._failed: dict[int, float] = {}  # deployment id -> monotonic time of failure

    # ------------------------------------------------------------------ serving side
    @property
    def current(self) -> LoadedModel | None:
        """The served model (a plain read: the swap is one assignment)."""
        return self._current

    def acquire(self) -> LoadedModel | None:
        """Pin the served model for one request; pair with ``LoadedModel.release``.

        Under the swap lock, so a model cannot be retired between being read
        and being counted as in use.
        """
        with self._swap_lock:
            cur = self._current
            if cur is not None:
                cur.acquire()
            return cur

    def status(self) -> dict[str, Any]:
        cur = self._current
        target = self.target
        return {
            "ready": cur is not None,
            "model_id": cur.model_id if cur else None,
            "deployment_id": cur.deployment_id if cur else None,
            "format": cur.format if cur else None,
            "device": cur.device if cur else None,
            "loaded_at": cur.loaded_at.isoformat() if cur else None,
            "target_model_id": target.model_id if target else None,
            "target_deployment_id": target.deployment_id if target else None,
            "loading_model_id": self.loading_model_id,
            "last_error": self.last_error,
            "subscribed": self.subscribed,
        }

    def unavailable_reason(self) -> str:
        """Why there is no model to serve, for 503 answers."""
        if not self.target_known:
            return "the inference worker is starting; no model is loaded yet"
        if self.target is None:
            return (
                "no model is deployed yet: promote one on the control plane "
                "(POST /models/{id}/promote)"
            )
        err = self.last_error
        if err and err.get("model_id") == self.target.model_id and self.loading_model_id is None:
            return f"model {self.target.model_id} failed to load: {err.get('error')}"
        return f"model {self.target.model_id} is loading; retry shortly"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._stop.clear()
        self._wake.set()  # read the database at once
        watcher = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._threads = [watcher]
        if self.broker_url and self.channel:
            listener = threading.Thread(target=self._listen, name="deploy-listener", daemon=True)
            self._threads.append(listener)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def nudge(self) -> None:
        """Re-read the deployment now (a pub/sub message arrived)."""
        self._wake.set()

    # ------------------------------------------------------------------ watcher
    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.refresh()
            except Exception as exc:  # the database may be briefly away
                log.warning("could not read the current deployment: %s", exc)

    def refresh(self) -> LoadedModel | None:
        """Bring the served model in line with the database; returns the served model."""
        target = self._resolve_target()
        self.target = target
        self.target_known = True
        cur = self._current
        if target is None or (cur is not None and cur.model_id == target.model_id):
            if target is not None:
                # The deployed model is the served one: an earlier failure to
                # load some other model no longer matters.
                self.last_error = None
            return cur
        failed_at = self._failed.get(target.deployment_id)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_interval:
            return cur  # tried this deployment recently; retry later, not every poll
        loaded = self._load(target)
        if loaded is None:
            return cur
        # Another promotion may have landed while this one loaded: swap only if
        # the loaded model is still the one to serve.
        latest = self._resolve_target()
        if latest is not None and latest.model_id != loaded.model_id:
            log.info(
                "model %s loaded but model %s is now deployed; not swapping",
                loaded.model_id,
                latest.model_id,
            )
            self._wake.set()
            return cur
        self._swap(loaded)
        return loaded

    def _load(self, target: ServedModel) -> LoadedModel | None:
        self.loading_model_id = target.model_id
        started = time.monotonic()
        try:
            folder = self._model_path(target)
            log.info("loading model %s (%s) from %s", target.model_id, target.model_format, folder)
            predictor = self._loader(folder, self.device, self.threads)
            for n in (1, 4):  # the calls serving makes (deploy.inference)
                predictor.predict_tokens(predictor.tokenize(WARMUP_TEXTS * n))
        except Exception as exc:
            log.exception("loading model %s failed; keeping the current model", target.model_id)
            self._failed[target.deployment_id] = time.monotonic()
            self.last_error = {
                "model_id": target.model_id,
                "deployment_id": target.deployment_id,
                "error": f"{type(exc).__name__}: {exc}",
                "at": datetime.now(UTC).isoformat(),
            }
            if self._on_load_failure is not None:
                self._on_load_failure(target.model_id)
            return None
        finally:
            self.loading_model_id = None
        seconds = time.monotonic() - started
        self._failed.pop(target.deployment_id, None)
        return LoadedModel(
            model_id=target.model_id,
            deployment_id=target.deployment_id,
            format=target.model_format,
            predictor=predictor,
            loaded_at=datetime.now(UTC),
            load_seconds=seconds,
        )

    def _swap(self, loaded: LoadedModel) -> None:
        with self._swap_lock:
            old = self._current
            self._current = loaded
            if old is not None:
                old.retire()
        self.last_error = None
        log.info(
            "now serving model %s (deployment %s, %s on %s; loaded in %.1f s)%s",
            loaded.model_id,
            loaded.deployment_id,
            loaded.format,
            loaded.device,
            loaded.load_seconds,
            f", was model {old.model_id}" if old else "",
        )
        if self._on_swap is not None:
            self._on_swap(loaded)

    # ------------------------------------------------------------------ pub/sub
    def _listen(self) -> None:
        import redis

        backoff = 1.0
        while not self._stop.is_set():
            pubsub = None
            try:
                client = redis.Redis.from_url(
                    str(self.broker_url), socket_connect_timeout=3, health_check_interval=15
                )
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(str(self.channel))
                self.subscribed = True
                backoff = 1.0
                # Messages sent while we were not subscribed are lost: look now.
                self.nudge()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        log.info("deployment message: %s", _decode(message.get("data")))
                        self.nudge()
            except Exception as exc:
                if self.subscribed or backoff == 1.0:
                    log.warning("deployment channel unavailable (%s); polling the database", exc)
                self.subscribed = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self.subscribed = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()


def _decode(data: Any) -> Any:
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return data
