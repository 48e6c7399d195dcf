"""A candidate inference worker: proposed changes to ``deploy``/``pipeline``, tried side by side.

Not part of the product. ``python -m bench.serving --variants baseline worker candidate
--candidate-factory bench.candidate_worker:app_factory`` serves the int8 student
through ``deploy.inference`` with these changes patched in at start-up
(``TEXTCLS_CANDIDATE`` picks them, comma-separated; default all three):

* ``adaptive`` — the batcher waits for more requests (up to
  ``batch_max_wait_ms``) only when the previous model call had more than one
  text, and then only for as many as that call had. A lone client never pays
  the wait; a crowd still gets full batches. (``deploy/batcher.py``,
  ``DynamicBatcher._loop``.)
* ``split`` — a gathered batch, already sorted by length, is cut into
  length groups that minimise padded tokens plus a per-call overhead
  (dynamic programming over the sorted lengths), all run in one executor
  call. A model's cost is per padded token, and 16 random review sentences
  pad to the longest (often ``max_length``), 2–3x the real tokens.
  (``deploy/batcher.py``, ``DynamicBatcher._run_chunks``.)
* ``skln`` — ONNX Runtime sessions for fp32/int8 graphs are created with
  ``disabled_optimizers=["SkipLayerNormFusion"]``: ORT 1.32's CPU
  ``SkipLayerNormalization`` kernel was slower than the ``Add`` +
  ``LayerNormalization`` it replaces (20% of the int8 model's kernel time).
  (``pipeline/runtime.py``, ``OnnxPredictor.__init__``.)

Off by default, for measurement: ``inline`` runs a lone single-text batch on
the event loop itself (no executor thread hop); it would block the loop for
a whole model call on bigger models.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import deploy.batcher as batcher
import deploy.inference as inference
import pipeline.runtime as runtime

FEATURES = frozenset(
    f.strip() for f in os.environ.get("TEXTCLS_CANDIDATE", "adaptive,split,skln").split(",") if f
)
# A model call's fixed cost in padded-token equivalents: ~0.3 ms of int8 work
# at ~10 us per token (measured on the default chain's student, one thread).
CALL_OVERHEAD_TOKENS = 30


def length_groups(lengths: Sequence[int], overhead: int = CALL_OVERHEAD_TOKENS) -> list[range]:
    """Cut ascending ``lengths`` into runs minimising sum(len(run) * max(run) + overhead)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + overhead + (j - i) * lengths[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[range] = []
    j = n
    while j > 0:
        out.append(range(cut[j], j))
        j = cut[j]
    return out[::-1]


class CandidateBatcher(batcher.DynamicBatcher):
    """``DynamicBatcher`` with the ``adaptive`` wait and ``split`` length groups."""

    _last_batch = 1

    async def _loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            wait, target = self.max_wait_s, self.max_batch_size
            if "adaptive" in FEATURES:
                wait = wait if self._last_batch > 1 else 0.0
                target = min(self.max_batch_size, self._last_batch)
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
                self._last_batch = sum(len(c.texts) for c in batch)
                try:
                    await self._run_chunks(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    batcher.log.exception("batch failed")

    async def _run_chunks(self, chunks: list[Any]) -> None:
        lone = len(chunks) == 1 and len(chunks[0].texts) == 1 and not self._pending
        if "inline" in FEATURES and lone and not chunks[0].future.done():
            # Measurement only: a lone text runs on the event loop, no thread hop.
            chunk = chunks[0]
            try:
                labels, probs = self._run(chunk.model, chunk.texts)
            except Exception as exc:
                chunk.future.set_exception(exc)
                return
            if self._on_batch is not None:
                self._on_batch(1)
            chunk.future.set_result(([int(labels[0])], [float(probs[0])]))
            return
        if "split" not in FEATURES:
            await super()._run_chunks(chunks)
            return
        loop = asyncio.get_running_loop()
        by_model: dict[int, list[Any]] = {}
        for chunk in chunks:
            by_model.setdefault(id(chunk.model), []).append(chunk)
        for group in by_model.values():
            model = group[0].model
            entries = [(c, i, t) for c in group for i, t in enumerate(c.texts)]
            entries = [e for e in entries if not e[0].future.done()]
            if not entries:
                continue
            entries.sort(key=lambda e: len(e[2]))
            cap = int(getattr(model.predictor, "max_length", 512))
            # Characters approximate tokens for the character-level vocabularies here.
            lengths = [min(len(t) + 2, cap) for _, _, t in entries]
            parts = [
                entries[s : min(r.stop, s + self.max_batch_size)]
                for r in length_groups(lengths)
                for s in range(r.start, r.stop, self.max_batch_size)
            ]
            texts = [[t for _, _, t in p] for p in parts]

            def run_all(model: Any = model, texts: list[list[str]] = texts) -> list[Any]:
                return [self._run(model, t) for t in texts]

            try:
                results = await loop.run_in_executor(self._executor, run_all)
            except Exception as exc:
                for chunk, _, _ in entries:
                    if not chunk.future.done():
                        chunk.future.set_exception(exc)
                continue
            for part, (labels, probs) in zip(parts, results, strict=True):
                if self._on_batch is not None:
                    self._on_batch(len(part))
                for (chunk, idx, _), label, prob in zip(part, labels, probs, strict=True):
                    chunk.labels[idx] = int(label)
                    chunk.probs[idx] = float(prob)
                    chunk.remaining -= 1
                    if chunk.remaining == 0 and not chunk.future.done():
                        chunk.future.set_result((chunk.labels, chunk.probs))


def _patch_runtime() -> None:
    """OnnxPredictor sessions without SkipLayerNormFusion (CPU, fp32 and int8 graphs)."""
    original = runtime.OnnxPredictor.__init__

    def init(self: Any, model_dir: Path, meta: Any, tokenizer: Any, **kwargs: Any) -> None:
        import onnxruntime as ort

        original(self, model_dir, meta, tokenizer, **kwargs)
        if self.device != "cpu" or meta.format == "onnx-fp16":
            return
        opts = ort.SessionOptions()
        threads = kwargs.get("threads")
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = runtime.graph_optimization_level(meta.format)
        self.session = ort.InferenceSession(
            str(Path(model_dir) / runtime.ONNX_FILE),
            opts,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["SkipLayerNormFusion"],
        )

    runtime.OnnxPredictor.__init__ = init  # type: ignore[method-assign]


def app_factory() -> Any:
    """``uvicorn --factory bench.candidate_worker:app_factory``."""
    if "skln" in FEATURES:
        _patch_runtime()
    inference.DynamicBatcher = CandidateBatcher  # type: ignore[misc]
    return inference.app_factory()
