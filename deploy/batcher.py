"""Dynamic batching: concurrent requests share one model call.

Requests put chunks of texts on a queue; one asyncio task gathers them,
sorts the gathered texts by length and cuts them into length groups (see
:func:`length_groups`), and runs the model on each group in a worker thread,
which keeps the event loop free. While the model runs, new requests pile up
and form the next, larger batch: that is what makes throughput grow with
concurrency.

How long to wait for more requests is adaptive. The loop keeps an estimate of
the demand: the texts of the last model call plus those that arrived while it
ran (with ``c`` clients each waiting for its answer before sending again, that
is ``c``). With a demand of one (a lone client) the next request runs at once,
since waiting could only add latency; otherwise the loop waits, at most
``max_wait_s`` after the oldest request arrived, until that many texts (capped
at ``max_batch_size``) are queued. A fixed wait costs a lone client
``max_wait_s`` on every request (measured with the int8 student on two cores,
``bench/serving.py``: concurrency 1 p50 7.4 ms with a 5 ms wait, ~1.8 ms
adaptive).

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
# (model, text) -> its cost in tokens (an estimate; it only steers grouping)
LengthFn = Callable[[Any, str], int]
# A model call's fixed cost in padded-token equivalents. Measured on the
# default bench chain's int8 student (one thread): ~0.3 ms per call against
# ~10 us per padded token. Larger models have a smaller relative overhead,
# so this errs towards fewer, larger calls for them.
CALL_OVERHEAD_TOKENS = 30


def char_length(_model: Any, text: str) -> int:
    """Characters plus [CLS]/[SEP]: the token count for character-level (Chinese) vocabularies."""
    return len(text) + 2


def length_groups(lengths: Sequence[int], max_size: int, overhead: int) -> list[range]:
    """Cut ascending ``lengths`` into runs of at most ``max_size`` with the least estimated cost.

    A run costs ``overhead + len(run) * max(run)``: every text is padded to the
    longest in its call, and each call has a fixed price. Random review
    sentences padded to the longest of 32 cost 2-3x their real tokens; one
    call per text pays the overhead 32 times. Dynamic programming over the
    sorted lengths finds the optimum in ``O(n * max_size)``. ``overhead`` 0
    turns grouping off: plain runs of ``max_size``.
    """
    n = len(lengths)
    if overhead <= 0:
        return [range(s, min(s + max_size, n)) for s in range(0, n, max_size)]
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for i in range(max(0, j - max_size), j):
            cost = best[i] + overhead + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs: list[range] = []
    j = n
    while j > 0:
        runs.append(range(cut[j], j))
        j = cut[j]
    return runs[::-1]


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


# (chunk, index of the text in its chunk, text)
_Entry = tuple[_Chunk, int, str]


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
        adaptive_wait: bool = True,
        length_of: LengthFn = char_length,
        call_overhead_tokens: int = CALL_OVERHEAD_TOKENS,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.adaptive_wait = adaptive_wait
        self._length_of = length_of
        self.call_overhead_tokens = max(0, int(call_overhead_tokens))
        # Texts of the last model call plus those that arrived while it ran:
        # how many to wait for next time.
        self._demand = 1
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
            # Wait for a full batch (adaptive: for the estimated demand, and not
            # at all when it is one), but never keep the oldest chunk waiting
            # longer than max_wait_s (time spent behind a model call counts).
            wait, target = self.max_wait_s, self.max_batch_size
            if self.adaptive_wait:
                wait = wait if self._demand > 1 else 0.0
                target = min(target, self._demand)
            deadline = self._pending[0].enqueued_at + wait
            while self._queued_live() < target:
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
                # Queued now: what was left over plus what arrived during the call.
                self._demand = sum(len(c.texts) for c in batch) + self._queued_live()

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

    def _plan(self, chunks: list[_Chunk]) -> list[tuple[Any, list[_Entry]]]:
        """Per model, the live texts sorted by length and cut into length groups."""
        by_model: dict[int, list[_Chunk]] = {}
        for chunk in chunks:
            if not chunk.future.done():
                by_model.setdefault(id(chunk.model), []).append(chunk)
        calls: list[tuple[Any, list[_Entry]]] = []
        for group in by_model.values():
            model = group[0].model
            entries = [(c, i, t) for c in group for i, t in enumerate(c.texts)]
            entries.sort(key=lambda e: len(e[2]))
            lengths = [self._length_of(model, t) for _, _, t in entries]
            # Estimates may disagree with the character order; the DP needs them ascending.
            for k in range(1, len(lengths)):
                lengths[k] = max(lengths[k], lengths[k - 1])
            for run in length_groups(lengths, self.max_batch_size, self.call_overhead_tokens):
                calls.append((model, entries[run.start : run.stop]))
        return calls

    async def _run_chunks(self, chunks: list[_Chunk]) -> None:
        calls = self._plan(chunks)
        if not calls:
            return

        def run_all() -> list[tuple[Sequence[Any], Sequence[Any]] | Exception]:
            # One thread hop for the whole batch; a failing group fails only its texts.
            out: list[tuple[Sequence[Any], Sequence[Any]] | Exception] = []
            for model, entries in calls:
                texts = [t for _, _, t in entries]
                try:
                    labels, probs = self._run(model, texts)
                    if len(labels) != len(texts) or len(probs) != len(texts):
                        raise RuntimeError(
                            f"model returned {len(labels)} labels for {len(texts)} texts"
                        )
                    out.append((labels, probs))
                except Exception as exc:
                    log.exception("model call on %d texts failed", len(texts))
                    out.append(exc)
            return out

        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, run_all)
        for (_, entries), result in zip(calls, results, strict=True):
            if isinstance(result, Exception):
                for chunk, _, _ in entries:
                    if not chunk.future.done():
                        chunk.future.set_exception(result)
                continue
            if self._on_batch is not None:
                self._on_batch(len(entries))
            labels, probs = result
            for (chunk, idx, _), label, prob in zip(entries, labels, probs, strict=True):
                chunk.labels[idx] = int(label)
                chunk.probs[idx] = float(prob)
                chunk.remaining -= 1
                if chunk.remaining == 0 and not chunk.future.done():
                    chunk.future.set_result((chunk.labels, chunk.probs))
