"""A candidate inference worker: a lone one-text request runs on the event loop.

Not part of the product; an example of ``bench.serving``'s ``candidate``
variant (``--variants baseline worker candidate --candidate-factory
bench.candidate_inline:app_factory``). When the batcher's demand is one text
and recent single-text calls took under 3 ms, the model runs on the event loop
itself, saving the two thread hand-offs. Measured (README, Benchmarks): p50 at
concurrency 1 x1.91 of bare inference against x2.09 for the shipped worker,
but fewer requests/s at concurrency 1, and it blocks the loop for a whole
model call, so it was not adopted.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI

import deploy.batcher as batcher
import deploy.inference as inference

# Only models this fast may block the event loop.
INLINE_MAX_CALL_S = 0.003


class InlineBatcher(batcher.DynamicBatcher):
    """``DynamicBatcher`` that runs a lone short call on the event loop."""

    _last_call_s = 1.0

    async def _run_chunks(self, chunks: list[Any]) -> None:
        lone = (
            self._demand <= 1
            and len(chunks) == 1
            and len(chunks[0].texts) == 1
            and not self._pending
            and not chunks[0].future.done()
        )
        started = time.perf_counter()
        if not (lone and self._last_call_s < INLINE_MAX_CALL_S):
            await super()._run_chunks(chunks)
            if lone:
                self._last_call_s = time.perf_counter() - started
            return
        chunk = chunks[0]
        try:
            labels, probs = self._run(chunk.model, chunk.texts)
        except Exception as exc:
            chunk.future.set_exception(exc)
            return
        self._last_call_s = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(1)
        chunk.future.set_result(([int(labels[0])], [float(probs[0])]))


def app_factory() -> FastAPI:
    """``uvicorn --factory bench.candidate_inline:app_factory``."""
    inference.DynamicBatcher = InlineBatcher  # type: ignore[misc]
    return inference.app_factory()
