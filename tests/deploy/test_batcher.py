"""The dynamic batcher and the predict input checks, in process (no model, no server)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from deploy.batcher import (
    PREPARE_INLINE_CHARS,
    BatcherClosed,
    DynamicBatcher,
    fifo_count,
    length_groups,
    next_call,
)
from deploy.inference import (
    PredictInputError,
    available_cores,
    model_calls_in_flight,
    parse_predict_body,
    settle_heap,
)


class FakeModel:
    """Labels a text with its length (mod 7), prob 1/(1+label); records each call."""

    def __init__(self, name: str, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.name = name
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def predict(self, texts: Sequence[str]) -> tuple[list[int], list[float]]:
        with self.lock:
            self.calls.append(list(texts))
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        labels = [len(t) % 7 for t in texts]
        return labels, [1.0 / (1 + x) for x in labels]


def _run(model: Any, texts: list[str]) -> tuple[list[int], list[float]]:
    return model.predict(texts)


def _expected(texts: Sequence[str]) -> tuple[list[int], list[float]]:
    labels = [len(t) % 7 for t in texts]
    return labels, [1.0 / (1 + x) for x in labels]


async def _with_batcher(coro_fn: Any, **kwargs: Any) -> Any:
    sizes: list[int] = []
    batcher = DynamicBatcher(_run, on_batch=sizes.append, **kwargs)
    batcher.start()
    try:
        return await coro_fn(batcher), sizes
    finally:
        await batcher.stop()


def test_concurrent_requests_share_batches_and_keep_order() -> None:
    model = FakeModel("a", delay=0.02)
    texts = [[f"{'字' * (i % 5 + 1)}{i}"] for i in range(40)]

    async def go(b: DynamicBatcher) -> list[Any]:
        return list(await asyncio.gather(*(b.predict(model, t) for t in texts)))

    results, sizes = asyncio.run(_with_batcher(go, max_batch_size=8, max_wait_s=0.01))
    assert [r for r in results] == [_expected(t) for t in texts]
    assert sum(sizes) == 40
    assert max(sizes) == 8 and len(sizes) <= 6  # gathered, not one call per request
    # Length-aware grouping: each model call holds texts sorted by length.
    for call in model.calls:
        assert [len(t) for t in call] == sorted(len(t) for t in call)


def test_list_is_split_and_reassembled_in_order() -> None:
    model = FakeModel("a")
    texts = [f"{'好' * (i % 9 + 1)}" for i in range(50)]

    async def go(b: DynamicBatcher) -> Any:
        return await b.predict(model, texts)

    (labels, probs), sizes = asyncio.run(_with_batcher(go, max_batch_size=16, max_wait_s=0.001))
    assert (labels, probs) == _expected(texts)
    assert all(s <= 16 for s in sizes) and sum(sizes) == 50


def test_batches_never_mix_models() -> None:
    a, b = FakeModel("a", delay=0.01), FakeModel("b", delay=0.01)

    async def go(bt: DynamicBatcher) -> Any:
        jobs = [bt.predict(a if i % 2 else b, [f"t{i}"]) for i in range(20)]
        return await asyncio.gather(*jobs)

    asyncio.run(_with_batcher(go, max_batch_size=32, max_wait_s=0.01))
    assert all(t.startswith("t") for call in a.calls for t in call)
    assert sorted(int(t[1:]) for call in a.calls for t in call) == list(range(1, 20, 2))
    assert sorted(int(t[1:]) for call in b.calls for t in call) == list(range(0, 20, 2))


def test_model_error_fails_only_its_batch() -> None:
    model = FakeModel("a", fail_on="bad")

    async def go(b: DynamicBatcher) -> Any:
        bad = await asyncio.gather(b.predict(model, ["bad"]), return_exceptions=True)
        good = await b.predict(model, ["good"])
        return bad, good

    (bad, good), _ = asyncio.run(_with_batcher(go, max_batch_size=4, max_wait_s=0.0))
    assert isinstance(bad[0], RuntimeError)
    assert good == _expected(["good"])


def _cost(lengths: list[int], runs: list[range], overhead: int) -> int:
    return sum(overhead + len(r) * lengths[r.stop - 1] for r in runs)


def test_length_groups_are_optimal_and_bounded() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 9)
        lengths = sorted(rng.randint(3, 130) for _ in range(n))
        max_size, overhead = rng.randint(1, 6), rng.choice([0, 5, 30, 200])
        runs = length_groups(lengths, max_size, overhead)
        # The runs cover 0..n in order, none longer than max_size.
        assert [i for r in runs for i in r] == list(range(n))
        assert all(1 <= len(r) <= max_size for r in runs)
        if overhead == 0:  # grouping off: plain runs of max_size
            assert [len(r) for r in runs[:-1]] == [max_size] * (len(runs) - 1)
            continue
        # Brute force over every way to cut: nothing is cheaper.
        best = min(
            _cost(lengths, [range(a, b) for a, b in itertools.pairwise((0, *cuts, n))], overhead)
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
            if all(b - a <= max_size for a, b in itertools.pairwise((0, *cuts, n)))
        )
        assert _cost(lengths, runs, overhead) == best


def test_uneven_lengths_are_split_into_groups() -> None:
    """Short texts do not pay for a long one's padding when calls are cheap enough."""
    model = FakeModel("a", delay=0.05)
    texts = ["短" * 5] * 6 + ["长" * 120] * 2

    async def go(b: DynamicBatcher) -> Any:
        # One request occupies the model while the rest queue up together.
        first = asyncio.ensure_future(b.predict(model, ["先"]))
        while not model.calls:  # the model thread has started the first call
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(*(b.predict(model, [t]) for t in texts))
        return await first, rest

    (first, rest), _ = asyncio.run(
        _with_batcher(go, max_batch_size=32, max_wait_s=0.0, call_overhead_tokens=30)
    )
    assert first == _expected(["先"]) and rest == [_expected([t]) for t in texts]
    assert sorted(len(c) for c in model.calls[1:]) == [2, 6]
    assert [len(t) for t in model.calls[1]] == [5] * 6  # groups run shortest first
    # With grouping off the same queue is one padded call.
    model2 = FakeModel("b", delay=0.05)

    async def go2(b: DynamicBatcher) -> Any:
        first = asyncio.ensure_future(b.predict(model2, ["先"]))
        while not model2.calls:
            await asyncio.sleep(0.001)
        await asyncio.gather(*(b.predict(model2, [t]) for t in texts))
        return await first

    asyncio.run(_with_batcher(go2, max_batch_size=32, max_wait_s=0.0, call_overhead_tokens=0))
    assert [len(c) for c in model2.calls] == [1, 8]


def test_an_overdue_oldest_text_goes_next_whatever_its_length() -> None:
    # Text 0 is long and oldest; eight short texts queued after it.
    ages = [0.5] + [0.01] * 8
    lengths = [120] + [6] * 8
    before = next_call(ages, lengths, max_size=32, overhead=30, max_queue_s=1.0)
    assert before == [[1, 2, 3, 4, 5, 6, 7, 8]]  # not overdue yet: the cheap short group alone
    overdue = next_call(ages, lengths, max_size=32, overhead=30, max_queue_s=0.5)
    # Overdue: the batch is cut from it, and inside the batch the short texts
    # are not padded to its length.
    assert overdue == [[1, 2, 3, 4, 5, 6, 7, 8], [0]]
    # Grouping is kept where it pays: texts near its length go with it.
    near = next_call([0.5, 0.1, 0.1], [120, 6, 118], max_size=32, overhead=30, max_queue_s=0.0)
    assert near == [[1], [2, 0]]


def test_fifo_count_keeps_to_the_size_and_token_budget() -> None:
    assert fifo_count([10] * 40, max_size=32, max_tokens=4096) == 32
    assert fifo_count([10] * 5, max_size=32, max_tokens=4096) == 5
    # 4 x 100 padded tokens fit in 400, a fifth text would pad to 5 x 100.
    assert fifo_count([10, 100, 10, 10, 10, 10], max_size=32, max_tokens=400) == 4
    assert fifo_count([500, 10], max_size=32, max_tokens=400) == 1  # the oldest always goes
    assert fifo_count([], max_size=32, max_tokens=400) == 0


def test_batches_are_cut_from_the_oldest_text_in_queue_order() -> None:
    """With the default bound every batch is a prefix of the queue: nobody jumps it."""
    import random

    rng = random.Random(0)
    queue = [rng.choice([4, 6, 9, 12, 20, 40, 126]) for _ in range(300)]
    served, cut_by_tokens = 0, 0
    while served < len(queue):
        rest = queue[served:]
        groups = next_call(
            [0.0] * len(rest), rest, max_size=32, overhead=30, max_queue_s=0.0, max_tokens=1024
        )
        picked = sorted(i for g in groups for i in g)
        assert picked == list(range(len(picked)))  # the oldest texts, none skipped
        assert len(picked) <= 32 and len(picked) * max(rest[i] for i in picked) <= 1024
        cut_by_tokens += len(picked) < min(32, len(rest))
        for g in groups:  # each group sorted by length
            assert [rest[i] for i in g] == sorted(rest[i] for i in g)
        served += len(picked)
    assert cut_by_tokens, "the token budget never bound: the test would prove nothing"


def _simulate(max_queue_s: float, steps: int, seed: int) -> dict[int, dict[str, Any]]:
    """A queue fed with random texts (a few long), drained one next_call per step.

    Time is simulated: each call advances the clock by its padded cost. Returns per
    text: arrival, when it became overdue, how many calls passed it over while it was
    overdue, and how many older texts were queued when it became overdue.
    """
    import random

    rng = random.Random(seed)
    clock, next_id = 0.0, 0
    queue: list[int] = []  # ids, oldest first
    info: dict[int, dict[str, Any]] = {}
    for _ in range(steps):
        for _ in range(rng.randint(0, 12)):
            length = rng.choice([4, 6, 9, 12, 20, 40]) if rng.random() > 0.1 else 126
            info[next_id] = {"at": clock, "length": length, "passed": 0, "older": None}
            queue.append(next_id)
            next_id += 1
        if not queue:
            clock += 0.001
            continue
        window = queue[:128]
        ages = [clock - info[i]["at"] for i in window]
        for i, age in zip(window, ages, strict=True):
            if age >= max_queue_s and info[i]["older"] is None:
                info[i]["older"] = queue.index(i)
        groups = next_call(
            ages, [info[i]["length"] for i in window], max_size=32, overhead=30,
            max_queue_s=max_queue_s,
        )  # fmt: skip
        call = [window[k] for g in groups for k in g]
        assert 1 <= len(call) <= 32
        if ages[0] >= max_queue_s:
            assert window[0] in call  # an overdue oldest text is never passed over
        for i in queue:
            if i not in call and info[i]["older"] is not None:
                info[i]["passed"] += 1
        queue = [i for i in queue if i not in call]
        for i in call:
            info[i]["served"] = clock
        for g in groups:
            clock += 0.0003 + 0.00001 * len(g) * max(info[window[k]]["length"] for k in g)
    return info


@pytest.mark.parametrize("max_queue_s", [0.0, 0.005, 0.02])
def test_no_text_is_passed_over_more_than_the_bound_allows(max_queue_s: float) -> None:
    """Once overdue, a text is passed over at most once per text queued before it."""
    for seed in range(3):
        info = _simulate(max_queue_s, steps=400, seed=seed)
        overdue = [t for t in info.values() if t["older"] is not None]
        assert overdue, "the load never made a text overdue: the test would prove nothing"
        for t in overdue:
            assert t["passed"] <= t["older"], t
        long_texts = [t for t in info.values() if t["length"] == 126 and "served" in t]
        assert long_texts


def test_without_the_bound_a_long_text_can_wait_forever() -> None:
    """What the bound prevents: cheap short groups keep jumping a long old text."""
    ages, lengths = [0.0], [126]
    for step in range(50):
        # Every step eight fresh short texts arrive and the clock moves on 10 ms.
        ages = [a + 0.01 for a in ages] + [0.0] * 8
        lengths = lengths + [6] * 8
        (picked,) = next_call(ages, lengths, max_size=8, overhead=30, max_queue_s=float("inf"))
        assert 0 not in picked, f"served at step {step}"
        ages = [a for k, a in enumerate(ages) if k not in picked]
        lengths = [n for k, n in enumerate(lengths) if k not in picked]
    assert ages[0] >= 0.5  # still queued after 50 calls
    # With a bound of 100 ms the same stream serves it on the first call after 100 ms.
    groups = next_call(ages, lengths, max_size=8, overhead=30, max_queue_s=0.1)
    assert 0 in (i for g in groups for i in g)


CALL_S = 0.2


def _long_and_shorts(max_queue_s: float) -> tuple[list[list[str]], list[float], float, list[float]]:
    """A long request queued before six short ones, all behind a call that holds the model.

    Returns the model calls, the queue ages observed, and when the long request
    and each short one got its answer (every call after the first takes ``CALL_S``).
    """
    gate = threading.Event()
    model = GatedModel(gate, delay=CALL_S)
    ages: list[float] = []
    long_text, shorts = "长" * 100, [f"短{i}" for i in range(6)]

    async def answered(b: DynamicBatcher, text: str) -> float:
        await b.predict(model, [text])
        return time.monotonic()

    async def go(b: DynamicBatcher) -> tuple[float, list[float]]:
        first = asyncio.ensure_future(b.predict(model, ["先"]))
        while not model.calls:  # the first call has started and holds the model
            await asyncio.sleep(0.001)
        jobs = [asyncio.ensure_future(answered(b, long_text))]
        await asyncio.sleep(0)
        jobs += [asyncio.ensure_future(answered(b, t)) for t in shorts]
        while b.queued_texts < 1 + len(shorts):  # all queued behind the gated call
            await asyncio.sleep(0.001)
        gate.set()
        await first
        done = await asyncio.gather(*jobs)
        return done[0], list(done[1:])

    batcher = DynamicBatcher(
        _run, max_batch_size=32, max_wait_s=0.0, max_queue_s=max_queue_s,
        on_queue_age=ages.append,
    )  # fmt: skip

    async def main() -> tuple[float, list[float]]:
        batcher.start()
        try:
            return await go(batcher)
        finally:
            await batcher.stop()

    long_done, shorts_done = asyncio.run(main())
    return model.calls, ages, long_done, shorts_done


def test_a_batch_is_cut_from_the_oldest_request_and_answered_at_once() -> None:
    """The long request goes in the same batch as the newer short ones; all get answers together.

    Inside the batch the short texts are their own group (not padded to the long
    one), yet none of them is answered before the long one: every request of a
    batch waits for the same calls, which is what keeps the tail near the median.
    """
    calls, ages, long_done, shorts_done = _long_and_shorts(0.0)
    assert calls[1:] == [[f"短{i}" for i in range(6)], ["长" * 100]]
    assert len(ages) == 8 and all(a >= 0 for a in ages)
    # One delivery: the answers come within a fraction of one call of each other.
    assert max(abs(t - long_done) for t in shorts_done) < CALL_S / 2
    # Below the bound the short group jumps the long text and is answered a call earlier.
    calls, _, long_done, shorts_done = _long_and_shorts(3600.0)  # never overdue here
    assert calls[1:] == [[f"短{i}" for i in range(6)], ["长" * 100]]
    assert long_done - max(shorts_done) >= CALL_S * 0.9


class GatedModel(FakeModel):
    """A FakeModel whose calls wait until ``gate`` is set."""

    def __init__(self, gate: threading.Event, delay: float = 0.0) -> None:
        super().__init__("gated", delay=delay)
        self.gate = gate

    def predict(self, texts: Sequence[str]) -> tuple[list[int], list[float]]:
        out = super().predict(texts)
        self.gate.wait(30)
        return out


def test_adaptive_wait_skips_the_wait_for_a_lone_client() -> None:
    """One client at a time never waits max_wait_s; a fixed wait would add it to every request."""
    model = FakeModel("a")
    wait = 0.05

    async def sequential(b: DynamicBatcher) -> float:
        start = time.perf_counter()
        for i in range(10):
            await b.predict(model, [f"句子{i}"])
        return (time.perf_counter() - start) / 10

    adaptive, _ = asyncio.run(_with_batcher(sequential, max_wait_s=wait))
    fixed, _ = asyncio.run(_with_batcher(sequential, max_wait_s=wait, adaptive_wait=False))
    assert adaptive < wait / 2 <= wait <= fixed


def test_adaptive_wait_still_gathers_a_crowd() -> None:
    """Clients that each send again on an answer are gathered into one call per round."""
    model = FakeModel("a", delay=0.01)
    clients, requests = 8, 6

    async def client(b: DynamicBatcher, k: int) -> None:
        for i in range(requests):
            await b.predict(model, [f"c{k}-{i}"])
            await asyncio.sleep(0.001 * (k % 3))  # answers arrive back at slightly different times

    async def crowd(b: DynamicBatcher) -> None:
        await asyncio.gather(*(client(b, k) for k in range(clients)))

    _, sizes = asyncio.run(_with_batcher(crowd, max_batch_size=32, max_wait_s=0.05))
    assert sum(sizes) == clients * requests
    # The first call holds whoever came first; from then on every round comes in whole.
    assert sizes[-(requests - 1) :] == [clients] * (requests - 1)


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"", 422, "empty request body"),
        (b"{not json", 422, "invalid JSON"),
        (b"\xff\xfe{", 422, "UTF-8"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"texts": "x"}', 422, 'missing field "text"'),
        (b'{"text": ""}', 422, "empty string"),
        (b'{"text": "  \\n\\t"}', 422, "blank"),
        (b'{"text": []}', 422, "empty list"),
        (b'{"text": ["ok", 3]}', 422, "text[1] must be a string, got number"),
        (b'{"text": ["ok", ""]}', 422, "text[1] is an empty string"),
        (b'{"text": null}', 422, "got null"),
        (b'{"text": 5}', 422, "got number"),
        (b'{"text": "' + b"a" * 11 + b'"}', 422, "11 characters; the limit is 10"),
        (b'{"text": ["a", "b", "c", "d"]}', 422, "4 items; the limit is 3"),
    ],
)
def test_predict_body_errors(raw: bytes, status: int, fragment: str) -> None:
    with pytest.raises(PredictInputError) as err:
        parse_predict_body(raw, max_text_chars=10, max_batch_texts=3)
    assert err.value.status == status
    assert fragment in err.value.message


def test_predict_body_shapes() -> None:
    assert parse_predict_body(
        '{"text": "一句话"}'.encode(), max_text_chars=10, max_batch_texts=3
    ) == (
        ["一句话"],
        True,
    )
    assert parse_predict_body(
        '{"text": ["一句", "两句"]}'.encode(), max_text_chars=10, max_batch_texts=3
    ) == (["一句", "两句"], False)


def test_settle_heap_freezes_what_lives_and_still_collects_new_garbage() -> None:
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the collector frees it

    kept = Node()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        before = gc.get_freeze_count()
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        gc.collect()
        assert gone() is None  # cycles made after the freeze are still collected
        assert gc.get_freeze_count() == before  # and the frozen part was left alone
        # A swap settles again: what died since the last freeze is collected then.
        dead = weakref.ref(kept)
        del kept
        settle_heap()
        assert dead() is None
    finally:
        gc.unfreeze()


def test_the_running_batcher_keeps_to_the_token_budget() -> None:
    gate = threading.Event()
    model = GatedModel(gate)
    texts = [f"{i}{'字' * 49}" for i in range(10)]  # 50 characters: 52 tokens each

    async def go(b: DynamicBatcher) -> list[Any]:
        first = asyncio.ensure_future(b.predict(model, ["先"]))
        while not model.calls:
            await asyncio.sleep(0.001)
        jobs = [asyncio.ensure_future(b.predict(model, [t])) for t in texts]
        while b.queued_texts < len(texts):
            await asyncio.sleep(0.001)
        gate.set()
        await first
        return list(await asyncio.gather(*jobs))

    results, sizes = asyncio.run(
        _with_batcher(go, max_batch_size=32, max_wait_s=0.0, max_tokens=4 * 52)
    )
    assert results == [_expected([t]) for t in texts]
    assert sizes[1:] == [4, 4, 2]  # 4 x 52 padded tokens fit the budget, 5 would not
    assert [c for call in model.calls[1:] for c in call] == texts  # in queue order


def test_prepare_runs_as_requests_arrive_and_off_the_loop_for_big_ones() -> None:
    """``prepare`` makes each text's item once, on arrival; the model thread gets the items.

    Items here are (text, thread that prepared it); lengths come from the items.
    """
    model = FakeModel("a")
    seen_lengths: list[Any] = []

    def prepare(_model: Any, texts: Sequence[str]) -> list[tuple[str, str]]:
        if "坏" in texts:
            raise ValueError("cannot tokenize")
        return [(t, threading.current_thread().name) for t in texts]

    def length_of(_model: Any, item: tuple[str, str]) -> int:
        seen_lengths.append(item)
        return len(item[0])

    def run(m: Any, items: list[tuple[str, str]]) -> tuple[list[int], list[float]]:
        return m.predict([text for text, _ in items])

    big = ["长" * 1000] * (PREPARE_INLINE_CHARS // 1000 + 1)

    async def go(b: DynamicBatcher) -> tuple[Any, Any, str, Exception]:
        loop_thread = threading.current_thread().name
        small = await b.predict(model, ["好", "一般般"])
        large = await b.predict(model, big)
        try:
            await b.predict(model, ["坏"])
        except ValueError as exc:
            failed = exc
        return small, large, loop_thread, failed

    batcher = DynamicBatcher(run, length_of=length_of, prepare=prepare, max_wait_s=0.001)

    async def main() -> tuple[Any, Any, str, Exception]:
        batcher.start()
        try:
            return await go(batcher)
        finally:
            await batcher.stop()

    small, large, loop_thread, failed = asyncio.run(main())
    assert small == _expected(["好", "一般般"]) and large == _expected(big)
    assert "cannot tokenize" in str(failed)
    assert [t for t, _ in seen_lengths] == ["好", "一般般", *big]
    assert {name for _, name in seen_lengths[:2]} == {loop_thread}  # small: on the event loop
    assert loop_thread not in {name for _, name in seen_lengths[2:]}  # big: on a worker thread
    assert sorted(t for call in model.calls for t in call) == sorted(["好", "一般般", *big])


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_runs_that_many_calls_at_once(concurrency: int) -> None:
    """With two model threads two batches overlap; with one they never do."""
    running, overlap = 0, 0
    lock = threading.Lock()

    def run(_model: Any, texts: list[str]) -> tuple[list[int], list[float]]:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap = max(overlap, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return _expected(texts)

    async def main() -> list[Any]:
        batcher = DynamicBatcher(run, max_batch_size=2, max_wait_s=0.0, concurrency=concurrency)
        batcher.start()
        try:
            texts = [[f"句子{i}"] for i in range(8)]
            return list(await asyncio.gather(*(batcher.predict("m", t) for t in texts)))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results == [_expected([f"句子{i}"]) for i in range(8)]
    assert overlap == concurrency


def test_stop_fails_the_requests_of_every_model_thread() -> None:
    release = threading.Event()

    def run(_model: Any, texts: list[str]) -> tuple[list[int], list[float]]:
        release.wait(5)
        return _expected(texts)

    async def main() -> list[Any]:
        batcher = DynamicBatcher(run, max_batch_size=1, max_wait_s=0.0, concurrency=2)
        batcher.start()
        calls = [asyncio.ensure_future(batcher.predict("m", [t])) for t in ("一", "二", "三")]
        await asyncio.sleep(0.1)  # two calls running, one queued
        await batcher.stop()
        release.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, BatcherClosed) for o in outcomes)


def test_model_calls_in_flight_follow_the_cores_left_by_intra_op_threads() -> None:
    cores = available_cores()
    assert model_calls_in_flight(3, "cpu", 1) == 3  # set: as set
    assert model_calls_in_flight(0, "cpu", None) == 1  # ONNX Runtime takes every core itself
    assert model_calls_in_flight(0, "cpu", 1) == cores
    assert model_calls_in_flight(0, "cpu", cores) == 1
    assert model_calls_in_flight(0, "cpu", cores * 4) == 1


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrent_batches_take_even_shares(concurrency: int) -> None:
    """16 clients in a closed loop: two model threads take at most half of them each."""
    sizes: list[int] = []

    def run(_model: Any, texts: list[str]) -> tuple[list[int], list[float]]:
        sizes.append(len(texts))
        time.sleep(0.002 * len(texts))  # cost grows with the batch, as on a CPU
        return _expected(texts)

    async def client(batcher: DynamicBatcher, k: int) -> None:
        for i in range(10):
            assert await batcher.predict("m", [f"客户{k}第{i}句"]) == _expected([f"客户{k}第{i}句"])

    async def main() -> None:
        batcher = DynamicBatcher(run, max_batch_size=32, concurrency=concurrency)
        batcher.start()
        try:
            await asyncio.gather(*(client(batcher, k) for k in range(16)))
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert sum(sizes) == 160
    if concurrency == 2:
        assert max(sizes) <= 8
    else:
        assert max(sizes) > 8  # one thread gathers every waiting client
