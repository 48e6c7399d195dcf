"""The serving baselines: hand-written FastAPI apps, the same request shapes as the worker.

* :func:`create_handwritten_app` (``--onnx``) — what a user would write instead
  of adopting textcls: FastAPI + onnxruntime on the same ``model.onnx`` the
  worker serves, a synchronous route (Starlette's thread pool runs requests
  concurrently), the tokenizer's own padding, no batching across requests.
* :func:`create_app` — what the seed's ``deploy/`` did: one PyTorch model
  (the fp32 teacher), a synchronous endpoint whose model call holds a lock
  (one request at a time, whatever the concurrency), and every input padded
  to the model's ``max_length`` — no dynamic padding, no batching across
  requests, no compression.

Same request and response shapes as the inference worker (``{"text": str |
[str]}`` -> ``categories`` / ``probabilities``), so one load generator drives
them all.

Run: ``python -m bench.baseline_server --model DIR --port 8011 [--threads N] [--onnx]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

log = logging.getLogger(__name__)


class PredictIn(BaseModel):
    text: str | list[str]


def create_app(model_dir: Path, threads: int | None = None) -> FastAPI:
    """The seed-style app serving the PyTorch model in ``model_dir``."""
    import torch

    from pipeline.contract import ModelMeta
    from pipeline.modeling import load_model
    from pipeline.preprocess import encode, load_tokenizer

    if threads:
        torch.set_num_threads(int(threads))
    meta = ModelMeta.load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).float().eval()
    max_length = int(meta.max_length)
    lock = threading.Lock()

    def classify(texts: list[str]) -> tuple[list[int], list[float]]:
        # Fixed-length padding, as the seed's serving script did.
        enc = encode(tokenizer, texts, max_length, pad_to=max_length)
        inputs = {k: torch.from_numpy(v) for k, v in enc.items()}
        with lock, torch.inference_mode():
            logits = model(**inputs).logits
        probs = torch.softmax(logits.float(), dim=-1)
        best, labels = probs.max(dim=-1)
        return [int(x) for x in labels.tolist()], [float(x) for x in best.tolist()]

    classify(["预热"])  # first call pays for lazy initialisation

    app = FastAPI(title="seed-style baseline (PyTorch fp32, one request at a time)")

    @app.post("/predict")
    def predict(body: PredictIn) -> dict[str, Any]:
        single = isinstance(body.text, str)
        texts = [body.text] if isinstance(body.text, str) else list(body.text)
        if not texts or any(not t.strip() for t in texts):
            raise HTTPException(422, "text must be a non-empty string or list of strings")
        labels, probs = classify(texts)
        if single:
            return {"categories": labels[0], "probabilities": probs[0]}
        return {"categories": labels, "probabilities": probs}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def create_handwritten_app(model_dir: Path, threads: int | None = None) -> FastAPI:
    """FastAPI + onnxruntime, one request per ``session.run``, as a user would write it."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_length = int(json.loads((model_dir / "textcls.json").read_text())["max_length"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or 0)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), opts)
    names = [i.name for i in session.get_inputs()]
    # Fast tokenizers fail with "Already borrowed" when threads call them at once.
    tok_lock = threading.Lock()
    app = FastAPI(title="hand-written FastAPI + onnxruntime server")

    @app.post("/predict")
    def predict(body: PredictIn) -> dict[str, Any]:
        texts = [body.text] if isinstance(body.text, str) else body.text
        with tok_lock:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="np")  # fmt: skip
        (logits,) = session.run(None, {n: enc[n].astype(np.int64) for n in names})
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        labels, best = probs.argmax(axis=-1), probs.max(axis=-1)
        if isinstance(body.text, str):
            return {"categories": int(labels[0]), "probabilities": float(best[0])}
        return {"categories": labels.tolist(), "probabilities": best.tolist()}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument(
        "--onnx", action="store_true", help="the hand-written onnxruntime app (an onnx folder)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import uvicorn

    factory = create_handwritten_app if args.onnx else create_app
    app = factory(args.model, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
