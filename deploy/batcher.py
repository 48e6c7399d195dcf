"""Dynamic batching: concurrent requests share model calls, and every wait is bounded.

Requests put their texts on one queue (oldest first) from the event loop,
already tokenized there when a ``prepare`` function is given; a model thread
picks the next batch from the queue and runs it, and hands the answers back to
the event loop. While the model runs, new requests pile up and the next batch
is chosen from everything queued: that is what makes throughput grow with
concurrency. The thread picks its next batch itself the moment one returns, so
on a busy machine the model does not sit idle until the event loop gets a turn.

``concurrency`` model threads share the queue, so that many batches can run at
once (ONNX Runtime and PyTorch release the GIL while they compute). One call at
a time leaves cores idle when the model's intra-op threads are fewer than the
cores: on the serving benchmark's rbt3-shape int8 model (one intra-op thread,
two cores) the worker used 1.09 cores and served 0.78x the requests of a
hand-written server that ran one call per request on a thread pool (1.80 cores);
with two model threads it used 1.93 cores and served 1.26x (c=32, one run).

Which texts go in the next batch (:func:`next_call`):

* once the oldest queued text has waited ``max_queue_s`` (default 0: always),
  the oldest texts in queue order, at most ``max_batch_size`` of them and at
  most ``max_tokens`` padded tokens (``count x longest``), as HuggingFace
  TEI's queue cuts its batches (:func:`fifo_count`);
* otherwise (a bound above 0 and nothing overdue) the cheapest length group of
  the oldest ``max_gather`` texts (lowest padded cost per text), which lets
  long texts wait for company at the price of an unbounded tail below the
  bound.

A FIFO batch is sorted by length and cut into length groups
(:func:`length_groups`: padding waste against the fixed price of a call);
the model thread runs every group of the batch back to back and answers the
whole batch at once. So at a steady concurrency every request waits for about
the same work, whatever its length. Earlier releases answered each group as it
returned and served a cheap group first, and long sentences waited behind
short ones call after call: the serving benchmark measured a c=32 p99 of
2.1-2.6x the p50 then (garbage-collector pauses included, see
``deploy.inference.settle_heap``) and 1.41-1.75x with both changes. A text is
in the next batch once the texts before it fit in one, so its wait is bounded
by the queue ahead of it.

How long to wait for more requests is adaptive. The batcher keeps an estimate
of the demand: the texts of the last batch, of the other threads' running
batches and those queued when it returned (with ``c`` clients each waiting for
its answer before sending again, that is about ``c``). With a demand of one (a
lone client) the next request runs at once, since waiting could only add
latency; otherwise a thread waits, at most ``max_wait_s`` after the oldest
request arrived, until its share of that many texts (capped at
``max_batch_size``) is queued.

Every text is tied to the model object its request pinned, and a batch only
ever mixes texts of the same model, so a response never mixes models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Result = tuple[list[int], list[float]]
# A model call's labels and probabilities, or why it failed.
Outcome = tuple[Sequence[Any], Sequence[Any]] | Exception
# (model, items) -> (labels, probability of each predicted label); the items
# are the texts, or what ``prepare`` made of them
RunFn = Callable[[Any, list[Any]], tuple[Sequence[Any], Sequence[Any]]]
# (model, item) -> its cost in tokens (it steers grouping and the token budget)
LengthFn = Callable[[Any, Any], int]
# (model, texts) -> one item per text, made as a request arrives (tokenization)
PrepareFn = Callable[[Any, Sequence[str]], Sequence[Any]]
# A model call's fixed cost in padded-token equivalents. Measured on the
# default bench chain's int8 student (one thread): ~0.3 ms per call against
# ~10 us per padded token. Larger models have a smaller relative overhead,
# so this errs towards fewer, larger calls for them.
CALL_OVERHEAD_TOKENS = 30
# How long a text may be passed over for better-filled groups before batches
# are cut from the oldest text again. 0: always cut from the oldest (see the
# README's serving benchmark for what each choice measured).
MAX_QUEUE_S = 0.0
# Padded tokens (texts x longest) per batch: 32 texts at max_length 128 fit,
# so only longer-context models get fewer texts per batch and a request's wait
# behind one batch stays bounded as TEI's max_batch_tokens bounds it.
MAX_BATCH_TOKENS = 4096
SHUTTING_DOWN = "the inference server is shutting down"


# A request with more characters than this is prepared on a worker thread,
# not on the event loop: tokenizing one sentence takes tens of microseconds,
# a request of 256 long texts some milliseconds that other requests would wait.
PREPARE_INLINE_CHARS = 4096


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


def fifo_count(lengths: Sequence[int], *, max_size: int, max_tokens: int) -> int:
    """How many of the oldest texts (``lengths`` in queue order) fit in one batch.

    At most ``max_size`` texts and ``count x longest`` at most ``max_tokens``
    (every text is padded to the longest); the oldest text always goes, however long.
    """
    longest = 0
    for count, length in enumerate(lengths[:max_size]):
        longest = max(longest, length)
        if count and (count + 1) * longest > max_tokens:
            return count
    return min(len(lengths), max_size)


def by_length(
    indices: Sequence[int], lengths: Sequence[int], max_size: int, overhead: int
) -> list[list[int]]:
    """``indices`` sorted by length (ties in order) and cut into :func:`length_groups`."""
    order = sorted(indices, key=lambda i: (lengths[i], i))
    runs = length_groups([lengths[i] for i in order], max_size, overhead)
    return [[order[k] for k in run] for run in runs]


def next_call(
    ages: Sequence[float],
    lengths: Sequence[int],
    *,
    max_size: int,
    overhead: int,
    max_queue_s: float,
    max_tokens: int = MAX_BATCH_TOKENS,
) -> list[list[int]]:
    """The next batch of the queued texts (oldest first), as length groups of indices.

    ``ages[i]`` is how long text ``i`` has waited (``ages[0]`` the longest),
    ``lengths[i]`` its estimated cost in tokens. Once text 0 has waited
    ``max_queue_s``: the oldest :func:`fifo_count` texts, cut into length
    groups (shortest first). Before that: the one length group of all the
    texts with the lowest padded cost per text (ties: the group with the
    oldest text).
    """
    if not lengths:
        return []
    if ages[0] >= max_queue_s:
        count = fifo_count(lengths, max_size=max_size, max_tokens=max_tokens)
        return by_length(range(count), lengths, max_size, overhead)
    groups = by_length(range(len(lengths)), lengths, max_size, overhead)

    def key(group: list[int]) -> tuple[float, int]:
        longest = max(lengths[i] for i in group)
        return (overhead + len(group) * longest) / len(group), min(group)

    return [min(groups, key=key)]


class BatcherClosed(RuntimeError):
    """The batcher stopped (the server is shutting down)."""


@dataclass(eq=False)
class _Request:
    """One ``predict`` call: its texts' answers fill in as their model calls return."""

    model: Any
    size: int
    future: asyncio.Future[Result]
    labels: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.labels = [0] * self.size
        self.probs = [0.0] * self.size
        self.remaining = self.size


@dataclass(eq=False)
class _Text:
    """One queued text: which request and position it answers, when it arrived, its cost."""

    request: _Request
    index: int
    item: Any  # the text, or what ``prepare`` made of it
    enqueued_at: float
    length: int

    @property
    def live(self) -> bool:
        return not self.request.future.done()


class DynamicBatcher:
    """Gathers concurrent predictions into batches cut from the oldest text; waits are bounded."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue_s: float = MAX_QUEUE_S,
        max_tokens: int = MAX_BATCH_TOKENS,
        gather_factor: int = 4,
        adaptive_wait: bool = True,
        length_of: LengthFn = char_length,
        prepare: PrepareFn | None = None,
        call_overhead_tokens: int = CALL_OVERHEAD_TOKENS,
        on_batch: Callable[[int], None] | None = None,
        on_queue_age: Callable[[float], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        self._run = run
        self.concurrency = max(1, int(concurrency))
        self.adaptive_wait = adaptive_wait
        self._length_of = length_of
        self._prepare = prepare
        self.call_overhead_tokens = max(0, int(call_overhead_tokens))
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_queue_s = max(0.0, float(max_queue_s))
        self.max_tokens = max(1, int(max_tokens))
        # Below the bound: the oldest texts considered for the cheapest group
        # (up to this many batches' worth), so newer texts cannot jump the
        # queue from beyond it.
        self.max_gather = self.max_batch_size * max(1, int(gather_factor))
        self._on_batch = on_batch
        self._on_queue_age = on_queue_age
        # Shared by the event loop (which queues texts) and the model threads
        # (which pick and run calls); ``_cond`` guards both.
        self._cond = threading.Condition()
        self._queue: deque[_Text] = deque()
        # The texts each model thread is running, by thread.
        self._inflight: dict[int, list[_Text]] = {}
        # Texts of the last batch, of the other threads' batches and those
        # queued when it returned: how many to wait for next time (a share).
        self._demand = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the model threads; answers go back to the running event loop."""
        self._loop = asyncio.get_running_loop()
        # Each thread picks its next call itself the moment one returns, so
        # the model never waits for the event loop to be scheduled.
        self._threads = [
            threading.Thread(target=self._serve, args=(slot,), name=f"predict-{slot}", daemon=True)
            for slot in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue) + [t for batch in self._inflight.values() for t in batch]
            self._queue.clear()
            self._cond.notify_all()
        for text in pending:
            self._fail(text.request, BatcherClosed(SHUTTING_DOWN))
        # A model call in progress finishes on its own; nobody waits for it.

    @property
    def queued_texts(self) -> int:
        with self._cond:
            return self._live_count()

    # ------------------------------------------------------------------ requests
    async def predict(self, model: Any, texts: Sequence[str]) -> Result:
        """Labels and probabilities for ``texts``, all from ``model``.

        The texts of one request may land in different model calls but always
        run on the same model.
        """
        if self._closed or self._loop is None:
            raise BatcherClosed("the batcher is not running")
        items = await self._prepared(model, texts)
        request = _Request(model=model, size=len(texts), future=self._loop.create_future())
        now = time.monotonic()
        entries = [
            _Text(request, i, item, now, self._length_of(model, item))
            for i, item in enumerate(items)
        ]
        with self._cond:
            self._queue.extend(entries)
            self._cond.notify()
        try:
            return await request.future
        except BaseException:
            request.future.cancel()  # the model threads skip what nobody waits for any more
            raise

    async def _prepared(self, model: Any, texts: Sequence[str]) -> Sequence[Any]:
        """``prepare``'s items for ``texts`` (the texts themselves without one).

        Preparing here, as each request arrives (TEI tokenizes before it
        queues, too), keeps the work off the model thread: while one batch
        runs (ONNX Runtime releases the GIL), the next requests are tokenized
        on the other core. On the serving benchmark's chain (int8, 3 x 192,
        one thread, sorted batches of 32) ``predict`` took 621 us per text,
        ``predict_tokens`` on texts tokenized beforehand 535 us.
        """
        if self._prepare is None:
            return texts
        if sum(map(len, texts)) <= PREPARE_INLINE_CHARS:
            items = self._prepare(model, texts)
        else:
            items = await asyncio.to_thread(self._prepare, model, texts)
        if len(items) != len(texts):
            raise RuntimeError(f"prepare returned {len(items)} items for {len(texts)} texts")
        return items

    # ------------------------------------------------------------------ the model threads
    def _serve(self, slot: int) -> None:
        while True:
            groups = self._next_batch(slot)
            if groups is None:
                return
            outcomes = [self._call(group) for group in groups]
            with self._cond:
                self._inflight[slot] = []
                # This batch's clients (about to send again), the other threads'
                # and those queued now: about the number of clients in the loop.
                running = sum(map(len, self._inflight.values()))
                self._demand = sum(map(len, groups)) + running + self._live_count()
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the event loop is gone: shutting down
                self._loop.call_soon_threadsafe(self._deliver, groups, outcomes)

    def _call(self, group: list[_Text]) -> Outcome:
        """One model call on a length group; a failure fails only this group's requests."""
        texts = [t.item for t in group]
        try:
            labels, probs = self._run(group[0].request.model, texts)
            if len(labels) != len(texts) or len(probs) != len(texts):
                raise RuntimeError(f"model returned {len(labels)} labels for {len(texts)} texts")
        except Exception as exc:
            log.exception("model call on %d texts failed", len(texts))
            return exc
        return labels, probs

    def _next_batch(self, slot: int) -> list[list[_Text]] | None:
        """Wait for texts, then for company (see the module docs); ``None`` once stopped."""
        with self._cond:
            while not self._closed and not self._live_count():
                self._cond.wait()
            if self._closed:
                return None
            # Wait for a full batch (adaptive: for this thread's share of the
            # estimated demand, and not at all when it is one), but never keep
            # the oldest text waiting longer than max_wait_s (time spent behind
            # a batch counts).
            wait, target = self.max_wait_s, self.max_batch_size
            if self.adaptive_wait:
                wait = wait if self._demand > 1 else 0.0
                target = min(target, self._share(self._demand))
            deadline = self._queue[0].enqueued_at + wait
            while not self._closed and self._live_count() < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            groups = self._take(self._batch_cap())
            self._inflight[slot] = [t for group in groups for t in group]
        if self._on_queue_age is not None:
            now = time.monotonic()
            for group in groups:
                for t in group:
                    self._on_queue_age(now - t.enqueued_at)
        return groups or self._next_batch(slot)

    def _live_count(self) -> int:
        return sum(1 for t in self._queue if t.live)

    def _share(self, texts: int) -> int:
        """One thread's even share of ``texts`` (ceiling), at least one."""
        return max(1, -(-texts // self.concurrency))

    def _batch_cap(self) -> int:
        """At most this many texts in the next batch; holds the lock.

        With several model threads a batch takes only its thread's share of
        the demand (or of the queue, if more are queued), so concurrent
        batches come out even. Uneven ones persist: the clients of a small
        batch are answered first and fill the next small one, while those of
        a large one wait longer every time (on the serving benchmark's rbt3
        shape with two threads that made the c=32 p99 2.2x its p50).
        """
        if self.concurrency == 1 or not self.adaptive_wait:
            return self.max_batch_size
        wanted = max(self._share(self._demand), self._share(self._live_count()))
        return min(self.max_batch_size, wanted)

    def _take(self, max_size: int) -> list[list[_Text]]:
        """Remove the next batch from the queue (see :func:`next_call`); holds the lock."""
        while self._queue and not self._queue[0].live:  # the client went away
            self._queue.popleft()
        if not self._queue:
            return []
        model = self._queue[0].request.model
        window: list[_Text] = []
        for text in self._queue:
            if len(window) >= self.max_gather:
                break
            if text.live and text.request.model is model:
                window.append(text)
        now = time.monotonic()
        picked = next_call(
            [now - t.enqueued_at for t in window],
            [t.length for t in window],
            max_size=max_size,
            overhead=self.call_overhead_tokens,
            max_queue_s=self.max_queue_s,
            max_tokens=self.max_tokens,
        )
        groups = [[window[i] for i in group] for group in picked]
        chosen = {id(t) for group in groups for t in group}
        self._queue = deque(t for t in self._queue if id(t) not in chosen and t.live)
        return groups

    # ------------------------------------------------------------------ back on the event loop
    def _deliver(self, groups: list[list[_Text]], outcomes: list[Outcome]) -> None:
        """Answer a whole batch at once: every text of it waited for the same calls."""
        for group, outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, Exception):
                for t in group:
                    self._fail(t.request, outcome)
                continue
            if self._on_batch is not None:
                self._on_batch(len(group))
            for t, label, prob in zip(group, *outcome, strict=True):
                self._answer(t, int(label), float(prob))

    @staticmethod
    def _answer(t: _Text, label: int, prob: float) -> None:
        request = t.request
        request.labels[t.index] = label
        request.probs[t.index] = prob
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            request.future.set_result((request.labels, request.probs))

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
