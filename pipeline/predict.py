"""Step ``predict``: score every sentence of a dataset with any model folder, to a TSV.

The input is read and the output written a chunk of rows at a time, so memory
does not grow with the file. Within a chunk sentences run in length-grouped
batches (as :mod:`pipeline.evaluate` times them) and are written back in the
file's order, one line each::

    index<TAB>sentence<TAB>category<TAB>label<TAB>probability

``category`` is the predicted class id, ``label`` its name (the id itself
where the training data named no classes) and ``probability`` the softmax
probability of that class: the inference worker's answer for the sentence.
Labels in the input, if any, are ignored.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.common import ProgressFn, StepError, no_progress, run_cli_step
from pipeline.data import clean_text, iter_rows
from pipeline.preprocess import length_grouped_batches
from pipeline.runtime import Predictor, load_predictor, softmax, torch_threads

log = logging.getLogger(__name__)

OUTPUT_HEADER = ("index", "sentence", "category", "label", "probability")
# Rows read, scored and written at a time: large enough for length grouping
# to pay off, small enough that memory stays flat (a few MB of text).
CHUNK_ROWS = 2048


def count_rows(path: Path) -> int:
    """Data lines of a TSV file (blank lines included), read in blocks."""
    lines = 0
    with Path(path).open("rb") as f:
        while block := f.read(1 << 16):
            lines += block.count(b"\n")
    return max(0, lines - 1)


def _chunks(rows: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _score_chunk(
    predictor: Predictor, texts: list[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, their probabilities) for ``texts``, in their order."""
    logits = np.zeros((len(texts), predictor.num_labels), dtype=np.float32)
    # Grouped by character count, a close proxy for token count (one token per
    # Chinese character): tokenizing twice to group cost ~15% of an int8 run.
    lengths = [len(t) for t in texts]
    for idx in length_grouped_batches(lengths, batch_size, shuffle=False):
        logits[idx] = predictor.predict_encoded(predictor.encode([texts[i] for i in idx]))
    probs = softmax(logits)
    ids = probs.argmax(axis=-1)
    return ids, probs[np.arange(len(ids)), ids]


def _write_chunk(
    out: IO[str], chunk: list[tuple[str, str]], ids: np.ndarray, probs: np.ndarray, names: list[str]
) -> None:
    out.writelines(
        f"{clean_text(index)}\t{clean_text(text)}\t{int(c)}\t{clean_text(names[int(c)])}\t{p:.6f}\n"
        for (index, text), c, p in zip(chunk, ids, probs, strict=True)
    )


def predict(
    model_dir: Path,
    dataset_tsv: Path,
    out_tsv: Path,
    *,
    batch_size: int = 32,
    chunk_rows: int = CHUNK_ROWS,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write the predictions TSV for ``dataset_tsv`` (labelled or not) to ``out_tsv``.

    Returns the metrics: ``rows``, ``seconds`` and ``throughput_per_s`` (over
    the whole run: reading, tokenizing, the model and writing), the batch size,
    the model's format, device and label names.
    """
    if batch_size < 1 or chunk_rows < 1:
        raise StepError(f"batch_size and chunk_rows must be >= 1 (got {batch_size}, {chunk_rows})")
    with torch_threads(threads):
        total = count_rows(Path(dataset_tsv))
        progress(0.0, "loading model")
        predictor = load_predictor(Path(model_dir), device=device, threads=threads)
        try:
            names = predictor.label_names
            done = 0
            start = time.perf_counter()
            with Path(out_tsv).open("w", encoding="utf-8", newline="\n") as out:
                out.write("\t".join(OUTPUT_HEADER) + "\n")
                for chunk in _chunks(iter_rows(Path(dataset_tsv)), chunk_rows):
                    ids, probs = _score_chunk(predictor, [t for _, t in chunk], batch_size)
                    _write_chunk(out, chunk, ids, probs, names)
                    done += len(chunk)
                    progress(0.02 + 0.97 * done / max(total, done, 1), "predicting")
            seconds = time.perf_counter() - start
            if done == 0:
                raise StepError(f"{dataset_tsv} has no rows to score")
            result: dict[str, Any] = {
                "rows": done,
                "seconds": seconds,
                "throughput_per_s": done / seconds if seconds > 0 else float("inf"),
                "batch_size": batch_size,
                "format": predictor.format,
                "device": predictor.device,
                "label_names": names,
            }
        finally:
            predictor.close()
    progress(1.0, None)
    log.info(
        "scored %d sentences with %s (%s) in %.1fs: %.1f sentences/s",
        done,
        model_dir,
        result["format"],
        seconds,
        result["throughput_per_s"],
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.predict --model DIR --data X.tsv --out P.tsv``: metrics as JSON."""
    p = argparse.ArgumentParser(description="Score a TSV of sentences with a textcls model.")
    p.add_argument("--model", type=Path, required=True, help="model folder (any format)")
    p.add_argument("--data", type=Path, required=True, help="TSV, labelled or not")
    p.add_argument("--out", type=Path, required=True, help="predictions TSV to write")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli_step(
        lambda: predict(
            args.model,
            args.data,
            args.out,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
