"""The dynamic batcher and the predict input checks, in process (no model, no server)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from deploy.batcher import DynamicBatcher, length_groups
from deploy.inference import PredictInputError, parse_predict_body


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


def test_list_is_chunked_and_reassembled_in_order() -> None:
    model = FakeModel("a")
    texts = [f"{'好' * (i % 9 + 1)}" for i in range(50)]

    async def go(b: DynamicBatcher) -> Any:
        return await b.predict(model, texts)

    (labels, probs), sizes = asyncio.run(
        _with_batcher(go, max_batch_size=16, chunk_size=10, max_wait_s=0.001)
    )
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
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(b.predict(model, [t]) for t in texts))
        return await first, rest

    (first, rest), _ = asyncio.run(
        _with_batcher(go, max_batch_size=32, max_wait_s=0.0, call_overhead_tokens=30)
    )
    assert first == _expected(["先"]) and rest == [_expected([t]) for t in texts]
    assert sorted(len(c) for c in model.calls[1:]) == [2, 6]
    assert [len(t) for t in model.calls[1]] == [5] * 6  # the short group runs first
    # With grouping off the same queue is one padded call.
    model2 = FakeModel("b", delay=0.05)

    async def go2(b: DynamicBatcher) -> Any:
        first = asyncio.ensure_future(b.predict(model2, ["先"]))
        await asyncio.sleep(0.01)
        await asyncio.gather(*(b.predict(model2, [t]) for t in texts))
        return await first

    asyncio.run(_with_batcher(go2, max_batch_size=32, max_wait_s=0.0, call_overhead_tokens=0))
    assert [len(c) for c in model2.calls] == [1, 8]


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
