"""Dynamic batching: concurrent requests share one model call.

Requests put chunks of texts on a queue; one asyncio task gathers them until
``max_batch_size`` texts are waiting or the oldest has waited ``max_wait_s``,
sorts the gathered texts by length (so padding to the longest wastes little)
and runs the model on bounded sub-batches in a worker thread, which keeps the
event loop free. While the model runs, new requests pile up and form the next,
larger batch: that is what makes throughput grow with concurrency.

Every chunk is tied to the model object its request pinned, and a model call
only ever mixes chunks of the same model, so a response never mixes models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Result = tuple[list[int], list[float]]
# (model, texts) -> (labels, probability of each predicted label)
RunFn = Callable[[Any, list[str]], tuple[Sequence[Any], Sequence[Any]]]


class BatcherClosed(RuntimeError):
    """The batcher stopped (the server is shutting down)."""


@dataclass(eq=False)
class _Chunk:
    model: Any
    texts: list[str]
    future: asyncio.Future[Result]
    enqueued_at: float
    labels: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.labels = [0] * len(self.texts)
        self.probs = [0.0] * len(self.texts)
        self.remaining = len(self.texts)


class DynamicBatcher:
    """Gathers concurrent predictions into bounded, length-sorted model calls."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        chunk_size: int = 32,
        gather_factor: int = 4,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        # A chunk never exceeds one model call.
        self.chunk_size = max(1, min(int(chunk_size), self.max_batch_size))
        # Texts already queued beyond one batch are gathered too (up to this many
        # batches' worth) so length sorting has something to group.
        self.max_gather = self.max_batch_size * max(1, int(gather_factor))
        self._on_batch = on_batch
        self._pending: deque[_Chunk] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._arrived = asyncio.Event()
        # One thread: model calls run one at a time, each as large as possible.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            chunk = self._pending.popleft()
            if not chunk.future.done():
                chunk.future.set_exception(BatcherClosed("the inference server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued_texts(self) -> int:
        return sum(c.remaining for c in list(self._pending))

    # ------------------------------------------------------------------ requests
    async def predict(self, model: Any, texts: Sequence[str]) -> Result:
        """Labels and probabilities for ``texts``, all from ``model``.

        Texts are queued in chunks of ``chunk_size``; chunks of one request may
        land in different batches but always run on the same model.
        """
        if self._closed or self._arrived is None:
            raise BatcherClosed("the batcher is not running")
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(texts), self.chunk_size):
            chunk = _Chunk(
                model=model,
                texts=list(texts[start : start + self.chunk_size]),
                future=loop.create_future(),
                enqueued_at=loop.time(),
            )
            chunks.append(chunk)
            self._pending.append(chunk)
        self._arrived.set()
        try:
            results = await asyncio.gather(*(c.future for c in chunks))
        except BaseException:
            for c in chunks:  # let the loop skip what nobody waits for any more
                c.future.cancel()
            raise
        labels: list[int] = []
        probs: list[float] = []
        for chunk_labels, chunk_probs in results:
            labels.extend(chunk_labels)
            probs.extend(chunk_probs)
        return labels, probs

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for a full batch, but never keep the oldest chunk waiting
            # longer than max_wait_s (time spent behind a model call counts).
            deadline = self._pending[0].enqueued_at + self.max_wait_s
            while self._queued_live() < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                try:
                    await self._run_chunks(batch)
                except asyncio.CancelledError:
                    for chunk in batch:
                        if not chunk.future.done():
                            chunk.future.set_exception(
                                BatcherClosed("the inference server is shutting down")
                            )
                    raise
                except Exception:  # never let one bad batch kill the loop
                    log.exception("batch failed")

    def _queued_live(self) -> int:
        return sum(len(c.texts) for c in self._pending if not c.future.done())

    def _take(self) -> list[_Chunk]:
        taken: list[_Chunk] = []
        count = 0
        while self._pending and count < self.max_gather:
            chunk = self._pending.popleft()
            if chunk.future.done():  # the client went away
                continue
            taken.append(chunk)
            count += len(chunk.texts)
        return taken

    async def _run_chunks(self, chunks: list[_Chunk]) -> None:
        loop = asyncio.get_running_loop()
        by_model: dict[int, list[_Chunk]] = {}
        for chunk in chunks:
            by_model.setdefault(id(chunk.model), []).append(chunk)
        for group in by_model.values():
            model = group[0].model
            entries = [(c, i, t) for c in group for i, t in enumerate(c.texts)]
            entries.sort(key=lambda e: len(e[2]))
            for start in range(0, len(entries), self.max_batch_size):
                sub = [
                    e
                    for e in entries[start : start + self.max_batch_size]
                    if not e[0].future.done()
                ]
                if not sub:
                    continue
                texts = [t for _, _, t in sub]
                try:
                    labels, probs = await loop.run_in_executor(
                        self._executor, self._run, model, texts
                    )
                    if len(labels) != len(texts) or len(probs) != len(texts):
                        raise RuntimeError(
                            f"model returned {len(labels)} labels for {len(texts)} texts"
                        )
                except Exception as exc:
                    log.exception("model call on %d texts failed", len(texts))
                    for chunk, _, _ in sub:
                        if not chunk.future.done():
                            chunk.future.set_exception(exc)
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(texts))
                for (chunk, idx, _), label, prob in zip(sub, labels, probs, strict=True):
                    chunk.labels[idx] = int(label)
                    chunk.probs[idx] = float(prob)
                    chunk.remaining -= 1
                    if chunk.remaining == 0 and not chunk.future.done():
                        chunk.future.set_result((chunk.labels, chunk.probs))
