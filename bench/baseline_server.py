"""The serving baseline: what the seed's ``deploy/`` did, as a plain FastAPI app.

One PyTorch model (the fp32 teacher), a synchronous endpoint whose model call
holds a lock (one request at a time, whatever the concurrency), and every
input padded to the model's ``max_length`` — no dynamic padding, no batching
across requests, no compression. Same request and response shapes as the
inference worker (``{"text": str | [str]}`` -> ``categories`` /
``probabilities``), so one load generator drives both.

Run: ``python -m bench.baseline_server --model DIR --port 8011 [--threads N]``.
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, required=True, help="pytorch model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import uvicorn

    app = create_app(args.model, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
