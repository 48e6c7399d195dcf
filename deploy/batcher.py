"""Dynamic batching: concurrent requests share model calls, and none waits unboundedly.

Requests put their texts on one queue (oldest first) from the event loop; one
model thread picks the next call from the queue and runs it, one call at a
time, and hands the answers back to the event loop. While the model runs, new
requests pile up and the next call is chosen from everything queued: that is
what makes throughput grow with concurrency. The thread picks its next call
itself the moment one returns, so on a busy machine the model does not sit
idle until the event loop gets a turn.

Which texts go in the next call (:func:`next_call`): the oldest
``max_gather`` texts of the queue are sorted by length and cut into length
groups (:func:`length_groups`: padding waste against the fixed price of a
call). The next call is one of those groups:

* if the oldest queued text has waited ``max_queue_s`` or longer, the group
  that holds it, whatever its length (the fairness bound);
* otherwise the group with the lowest padded cost per text (short,
  well-filled groups first), which lets long texts wait a little for company.

So a text is in the next call once it is the oldest and overdue, and every
call while it is overdue serves an older text or it: it is passed over at most
once for each text queued before it. Earlier releases ran every group of a
gathered round and answered only when the whole round was done; now each
call's texts are answered as soon as that call returns, and the groups not
run yet are planned again with the texts that arrived meanwhile.

How long to wait for more requests is adaptive. The loop keeps an estimate of
the demand: the texts of the last model call plus those queued when it
returned (with ``c`` clients each waiting for its answer before sending again,
that is about ``c``). With a demand of one (a lone client) the next request
runs at once, since waiting could only add latency; otherwise the loop waits,
at most ``max_wait_s`` after the oldest request arrived, until that many texts
(capped at ``max_batch_size``) are queued.

Every text is tied to the model object its request pinned, and a model call
only ever mixes texts of the same model, so a response never mixes models.
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
# (model, texts) -> (labels, probability of each predicted label)
RunFn = Callable[[Any, list[str]], tuple[Sequence[Any], Sequence[Any]]]
# (model, text) -> its cost in tokens (an estimate; it only steers grouping)
LengthFn = Callable[[Any, str], int]
# A model call's fixed cost in padded-token equivalents. Measured on the
# default bench chain's int8 student (one thread): ~0.3 ms per call against
# ~10 us per padded token. Larger models have a smaller relative overhead,
# so this errs towards fewer, larger calls for them.
CALL_OVERHEAD_TOKENS = 30
# How long a text may be passed over for better-filled groups before it goes
# in the next call whatever its length. 0 serves the oldest text's group first,
# always (see the README's serving benchmark for what each choice measured).
MAX_QUEUE_S = 0.0
SHUTTING_DOWN = "the inference server is shutting down"


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


def next_call(
    ages: Sequence[float],
    lengths: Sequence[int],
    *,
    max_size: int,
    overhead: int,
    max_queue_s: float,
) -> list[int]:
    """Which of the queued texts (oldest first) go in the next model call: indices, shortest first.

    ``ages[i]`` is how long text ``i`` has waited (``ages[0]`` the longest),
    ``lengths[i]`` its estimated cost in tokens. The texts are sorted by
    length (ties in queue order) and cut with :func:`length_groups`; the call
    is the group holding text 0 when it has waited ``max_queue_s`` or longer,
    otherwise the group with the lowest padded cost per text (ties: the group
    with the oldest text).
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    sorted_lengths = [lengths[i] for i in order]
    runs = length_groups(sorted_lengths, max_size, overhead)
    if ages[0] >= max_queue_s:
        chosen = next(r for r in runs if 0 in (order[k] for k in r))
    else:

        def key(run: range) -> tuple[float, int]:
            per_text = (overhead + len(run) * sorted_lengths[run.stop - 1]) / len(run)
            return per_text, min(order[k] for k in run)

        chosen = min(runs, key=key)
    return [order[k] for k in chosen]


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
    text: str
    enqueued_at: float
    length: int

    @property
    def live(self) -> bool:
        return not self.request.future.done()


class DynamicBatcher:
    """Gathers concurrent predictions into length-grouped model calls; every wait is bounded."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue_s: float = MAX_QUEUE_S,
        gather_factor: int = 4,
        adaptive_wait: bool = True,
        length_of: LengthFn = char_length,
        call_overhead_tokens: int = CALL_OVERHEAD_TOKENS,
        on_batch: Callable[[int], None] | None = None,
        on_queue_age: Callable[[float], None] | None = None,
    ) -> None:
        self._run = run
        self.adaptive_wait = adaptive_wait
        self._length_of = length_of
        self.call_overhead_tokens = max(0, int(call_overhead_tokens))
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_queue_s = max(0.0, float(max_queue_s))
        # The oldest texts considered for the next call (up to this many
        # batches' worth), so length grouping has something to group while
        # newer texts cannot jump the queue from beyond it.
        self.max_gather = self.max_batch_size * max(1, int(gather_factor))
        self._on_batch = on_batch
        self._on_queue_age = on_queue_age
        # Shared by the event loop (which queues texts) and the model thread
        # (which picks and runs calls); ``_cond`` guards both.
        self._cond = threading.Condition()
        self._queue: deque[_Text] = deque()
        self._inflight: list[_Text] = []
        # Texts of the last model call plus those queued when it returned:
        # how many to wait for next time.
        self._demand = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the model thread; answers go back to the running event loop."""
        self._loop = asyncio.get_running_loop()
        # One thread: model calls run one at a time, and the thread picks its
        # next call itself the moment one returns, so the model never waits
        # for the event loop to be scheduled.
        self._thread = threading.Thread(target=self._serve, name="predict", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue) + self._inflight
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
        request = _Request(model=model, size=len(texts), future=self._loop.create_future())
        now = time.monotonic()
        entries = [
            _Text(request, i, t, now, self._length_of(model, t)) for i, t in enumerate(texts)
        ]
        with self._cond:
            self._queue.extend(entries)
            self._cond.notify()
        try:
            return await request.future
        except BaseException:
            request.future.cancel()  # the model thread skips what nobody waits for any more
            raise

    # ------------------------------------------------------------------ the model thread
    def _serve(self) -> None:
        while True:
            call = self._next_call()
            if call is None:
                return
            model, texts = call[0].request.model, [t.text for t in call]
            outcome: tuple[Sequence[Any], Sequence[Any]] | Exception
            try:
                outcome = self._run(model, texts)
                if len(outcome[0]) != len(texts) or len(outcome[1]) != len(texts):
                    raise RuntimeError(
                        f"model returned {len(outcome[0])} labels for {len(texts)} texts"
                    )
            except Exception as exc:  # a failing call fails only its requests
                log.exception("model call on %d texts failed", len(texts))
                outcome = exc
            with self._cond:
                self._inflight = []
                # Queued now: what arrived during the call plus what was left over.
                self._demand = len(call) + self._live_count()
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the event loop is gone: shutting down
                self._loop.call_soon_threadsafe(self._deliver, call, outcome)

    def _next_call(self) -> list[_Text] | None:
        """Wait for texts, then for company (see the module docs); ``None`` once stopped."""
        with self._cond:
            while not self._closed and not self._live_count():
                self._cond.wait()
            if self._closed:
                return None
            # Wait for a full batch (adaptive: for the estimated demand, and not
            # at all when it is one), but never keep the oldest text waiting
            # longer than max_wait_s (time spent behind a model call counts).
            wait, target = self.max_wait_s, self.max_batch_size
            if self.adaptive_wait:
                wait = wait if self._demand > 1 else 0.0
                target = min(target, self._demand)
            deadline = self._queue[0].enqueued_at + wait
            while not self._closed and self._live_count() < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            call = self._take()
            self._inflight = call
        if self._on_queue_age is not None:
            now = time.monotonic()
            for t in call:
                self._on_queue_age(now - t.enqueued_at)
        return call or self._next_call()

    def _live_count(self) -> int:
        return sum(1 for t in self._queue if t.live)

    def _take(self) -> list[_Text]:
        """Remove the next call's texts from the queue (see :func:`next_call`); holds the lock."""
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
            max_size=self.max_batch_size,
            overhead=self.call_overhead_tokens,
            max_queue_s=self.max_queue_s,
        )
        call = [window[i] for i in picked]
        chosen = {id(t) for t in call}
        self._queue = deque(t for t in self._queue if id(t) not in chosen and t.live)
        return call

    # ------------------------------------------------------------------ back on the event loop
    def _deliver(
        self, call: list[_Text], outcome: tuple[Sequence[Any], Sequence[Any]] | Exception
    ) -> None:
        if isinstance(outcome, Exception):
            for t in call:
                self._fail(t.request, outcome)
            return
        if self._on_batch is not None:
            self._on_batch(len(call))
        for t, label, prob in zip(call, *outcome, strict=True):
            request = t.request
            request.labels[t.index] = int(label)
            request.probs[t.index] = float(prob)
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result((request.labels, request.probs))

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
