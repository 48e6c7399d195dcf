"""The inference worker: the seed's ``POST /predict`` with dynamic batching.

Run it with ``uvicorn --factory deploy.inference:app_factory`` (see
``launch.services.inference_command``). It serves the model named by the
newest deployment in the database and switches without a restart when a model
is promoted or rolled back (see :mod:`deploy.registry`).

Request and response shapes are the seed's, exactly::

    {"text": "一句话"}          -> {"categories": 3, "probabilities": 0.97, "model_id": 7, ...}
    {"text": ["一句", "两句"]}  -> {"categories": [3, 0], "probabilities": [0.97, 0.88], ...}

``probabilities`` is the softmax probability of the predicted class; the extra
``labels`` key gives the predicted classes' names (from the training data, or
the id as a string where it named none) and ``model_id`` names the model that
produced the whole response.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deploy.batcher import BatcherClosed, DynamicBatcher, char_length
from deploy.metrics import InferenceMetrics
from deploy.registry import LoadedModel, LoaderFn, ModelRegistry, TargetFn, default_loader
from textcls import __version__
from textcls.deployments import ServedModel, current_served, deployment_channel
from textcls.settings import Settings, get_settings

log = logging.getLogger(__name__)


class PredictInputError(Exception):
    """A request the client must fix; ``status`` is 4xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- input


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_text(value: Any, where: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise PredictInputError(
            422, f"{where} must be a string, got {_json_type(value)} {json.dumps(value)[:50]}"
        )
    if not value:
        raise PredictInputError(422, f"{where} is an empty string")
    if not value.strip():
        raise PredictInputError(422, f"{where} is blank (whitespace only)")
    if len(value) > max_chars:
        raise PredictInputError(
            422, f"{where} has {len(value)} characters; the limit is {max_chars}"
        )
    return value


def parse_predict_body(
    raw: bytes, *, max_text_chars: int, max_batch_texts: int
) -> tuple[list[str], bool]:
    """Validate a predict body; returns (texts, whether a single text was sent)."""
    if not raw.strip():
        raise PredictInputError(422, 'empty request body; send JSON like {"text": "一句话"}')
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise PredictInputError(422, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise PredictInputError(
            422, f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(body, dict):
        raise PredictInputError(
            422,
            f'the body must be a JSON object like {{"text": "..."}}, got {_json_type(body)}',
        )
    if "text" not in body:
        raise PredictInputError(422, 'missing field "text" (a string, or a list of strings)')
    text = body["text"]
    if isinstance(text, str):
        return [_check_text(text, "text", max_text_chars)], True
    if isinstance(text, list):
        if not text:
            raise PredictInputError(422, "text is an empty list; send at least one string")
        if len(text) > max_batch_texts:
            raise PredictInputError(
                422, f"text has {len(text)} items; the limit is {max_batch_texts} per request"
            )
        return [_check_text(t, f"text[{i}]", max_text_chars) for i, t in enumerate(text)], False
    raise PredictInputError(
        422, f"text must be a string or a list of strings, got {_json_type(text)}"
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise PredictInputError(400, "invalid Content-Length header") from None
        if too_big:
            raise PredictInputError(413, f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.stream():
        body.extend(part)
        if len(body) > limit:
            raise PredictInputError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


# --------------------------------------------------------------------------- app


def _served_from_db() -> ServedModel | None:
    from textcls.db import session_scope

    with session_scope() as session:
        return current_served(session)


def _model_folder(target: ServedModel) -> Path:
    from textcls.store import ArtifactStore

    return ArtifactStore().resolve(target.model_path)


def _tokenize(model: LoadedModel, texts: Sequence[str]) -> Sequence[Any]:
    # On the event loop as a request arrives (see DynamicBatcher._prepared).
    tokens: Sequence[Any] = model.predictor.tokenize(texts)
    return tokens


def _run_model(model: LoadedModel, tokens: list[Any]) -> tuple[Any, Any]:
    # Pads the batch and runs it: the model thread does no tokenizing.
    return model.predictor.predict_tokens(tokens)


def _label_names(model: LoadedModel, categories: list[int]) -> list[str]:
    """The name of each predicted class (its id as a string where the model names none)."""
    names: list[str] = list(getattr(model.predictor, "label_names", None) or [])
    return [names[c] if 0 <= c < len(names) else str(c) for c in categories]


def _token_count(_model: LoadedModel, tokens: Any) -> int:
    # Exact, specials included and truncated at max_length: the batch's cost.
    return len(tokens.ids)


def _run_texts(model: LoadedModel, texts: list[str]) -> tuple[Any, Any]:
    # batch_tokenize_on_arrival off: the model thread tokenizes too.
    return model.predictor.predict(texts)


def _text_cost(model: LoadedModel, text: str) -> int:
    # Characters plus specials (one token per Chinese character), capped where
    # the tokenizer truncates.
    return min(char_length(model, text), int(getattr(model.predictor, "max_length", 512)))


def settle_heap() -> None:
    """Collect once, then keep everything alive now out of later full collections.

    The loaded worker holds ~440k objects (torch, transformers, SQLAlchemy,
    the model); a full (oldest-generation) collection of them took 205 ms
    here, and at c=32 such a pause now and then set the worker's p99 (a
    290 ms tail over a 37 ms median on the serving benchmark). Frozen objects
    are skipped by the collector (a full collection then took under 0.1 ms);
    refcounting still frees them. Called after each model swap: it unfreezes
    first, so reference cycles of a model retired since the last swap are
    collected then (a model still answering requests at a swap waits for the
    next one).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def model_calls_in_flight(concurrency: int, device: str, threads: int | None) -> int:
    """How many batches run at once: ``concurrency``, or (0) what the cores allow.

    Automatic: on a CPU, one call per ``threads`` intra-op threads that the
    cores hold (at least one); one call on CUDA, and when ``threads`` is unset
    (ONNX Runtime's default already takes one thread per core).
    """
    if concurrency > 0:
        return concurrency
    if not threads or _serves_on_cuda(device):
        return 1
    return max(1, available_cores() // threads)


def _serves_on_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    from pipeline.device import resolve_device  # torch: only when the device is not plainly CPU

    try:
        return resolve_device(device).type == "cuda"
    except Exception:  # a bad device fails the model load, which says why
        return False


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def create_app(
    settings: Settings | None = None,
    *,
    loader: LoaderFn = default_loader,
    resolve_target: TargetFn = _served_from_db,
    model_path: Callable[[ServedModel], Path] = _model_folder,
    subscribe: bool = True,
) -> FastAPI:
    """The inference app; ``loader`` and ``resolve_target`` are swappable for tests."""
    settings = settings or get_settings()
    metrics = InferenceMetrics()
    metrics.model_id.set(0)
    max_request_bytes = settings.max_request_bytes

    def on_swap(model: LoadedModel) -> None:
        settle_heap()
        metrics.swaps.inc()
        metrics.model_id.set(model.model_id)
        metrics.model_info.clear()
        metrics.model_info.labels(str(model.model_id), model.format, model.device).set(1)

    broker_url = settings.resolved_broker_url() if subscribe else None
    registry = ModelRegistry(
        resolve_target=resolve_target,
        model_path=model_path,
        loader=loader,
        device=settings.inference_device,
        threads=settings.inference_threads,
        poll_interval=settings.deployment_poll_interval,
        broker_url=broker_url,
        channel=deployment_channel(broker_url) if broker_url else None,
        on_swap=on_swap,
        on_load_failure=lambda _model_id: metrics.load_failures.inc(),
    )
    on_arrival = settings.batch_tokenize_on_arrival
    batcher = DynamicBatcher(
        _run_model if on_arrival else _run_texts,
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
        max_queue_s=settings.batch_max_queue_ms / 1000.0,
        max_tokens=settings.batch_max_tokens,
        adaptive_wait=settings.batch_adaptive_wait,
        length_of=_token_count if on_arrival else _text_cost,
        prepare=_tokenize if on_arrival else None,
        call_overhead_tokens=settings.batch_call_overhead_tokens,
        on_batch=metrics.batch_size.observe,
        on_queue_age=metrics.queue_age.observe,
        concurrency=model_calls_in_flight(
            settings.batch_concurrency, settings.inference_device, settings.inference_threads
        ),
    )
    metrics.queued.set_function(lambda: batcher.queued_texts)
    metrics.model_threads.set(batcher.concurrency)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        log.info("inference: %d model call(s) at once", batcher.concurrency)
        registry.start()
        try:
            yield
        finally:
            await asyncio.to_thread(registry.stop)  # joins threads: keep the loop free
            await batcher.stop()

    app = FastAPI(
        title="textcls inference",
        version=__version__,
        description="The seed's single and batch classification endpoint, with dynamic "
        "batching and model switching without a restart.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.batcher = batcher
    app.state.metrics = metrics

    def _authorised(request: Request) -> bool:
        expected = settings.predict_api_key
        if not expected:
            return True
        presented = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if not presented and auth and auth.lower().startswith("bearer "):
            presented = auth[7:].strip()
        return presented is not None and secrets.compare_digest(
            presented.encode(), expected.encode()
        )

    async def _predict(request: Request) -> JSONResponse:
        if not _authorised(request):
            return JSONResponse(
                {"detail": "missing or wrong API key (send it as X-API-Key)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            raw = await _read_body(request, max_request_bytes)
            texts, single = parse_predict_body(
                raw,
                max_text_chars=settings.max_text_chars,
                max_batch_texts=settings.max_batch_texts,
            )
        except PredictInputError as exc:
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        # Pin the model now: the whole response comes from it even if a swap
        # happens while this request waits in the queue.
        model = registry.acquire()
        if model is None:
            return JSONResponse(
                {"detail": registry.unavailable_reason()},
                status_code=503,
                headers={"Retry-After": "2"},
            )
        try:
            labels, probs = await batcher.predict(model, texts)
        except BatcherClosed as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        finally:
            model.release()
        metrics.texts.inc(len(texts))
        names = _label_names(model, labels)
        if single:
            return JSONResponse(
                {
                    "categories": labels[0],
                    "probabilities": probs[0],
                    "labels": names[0],
                    "model_id": model.model_id,
                }
            )
        return JSONResponse(
            {
                "categories": labels,
                "probabilities": probs,
                "labels": names,
                "model_id": model.model_id,
            }
        )

    @app.post(
        "/predict",
        tags=["inference"],
        summary="Classify one text or a list of texts",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["text"],
                            "properties": {
                                "text": {
                                    "oneOf": [
                                        {"type": "string", "minLength": 1},
                                        {
                                            "type": "array",
                                            "items": {"type": "string", "minLength": 1},
                                            "minItems": 1,
                                        },
                                    ]
                                }
                            },
                        },
                        "examples": {
                            "one": {"value": {"text": "一句话"}},
                            "batch": {"value": {"text": ["一句", "两句"]}},
                        },
                    }
                },
            }
        },
    )
    async def predict(request: Request) -> JSONResponse:
        """``{"text": str | [str]}`` -> ``{"categories", "probabilities", "labels", "model_id"}``.

        ``labels`` names the predicted classes (the id as a string where the
        training data named none).
        """
        started = time.perf_counter()
        status = 500
        try:
            response = await _predict(request)
            status = response.status_code
            return response
        except Exception:
            log.exception("predict failed")
            return JSONResponse({"detail": "internal error while predicting"}, status_code=500)
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, str]:
        """The process is up (a model may not be loaded yet: see ``/ready``)."""
        # async: answered on the event loop, no thread-pool hop (probes are frequent)
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["meta"])
    def ready() -> JSONResponse:
        """200 once a model is loaded (with its id and format), 503 before."""
        state = registry.status()
        if state["ready"]:
            return JSONResponse({"status": "ready", **state})
        return JSONResponse(
            {"status": "not ready", "detail": registry.unavailable_reason(), **state},
            status_code=503,
        )

    @app.get("/metrics", tags=["meta"])
    async def prometheus_metrics() -> Response:
        # async: answered on the event loop, no thread-pool hop (the queue gauge
        # takes the batcher's lock for a moment).
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory deploy.inference:app_factory``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    sys.setswitchinterval(settings.gil_switch_ms / 1000.0)
    return create_app(settings)
