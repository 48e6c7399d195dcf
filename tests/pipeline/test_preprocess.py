"""The shared preprocessing: encode() gives exactly what the transformers call gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.corpus import Splits
from pipeline.data import read_tsv
from pipeline.preprocess import (
    collate,
    encode,
    load_tokenizer,
    make_char_tokenizer,
    token_lengths,
    tokenize,
)

KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _reference(tokenizer: Any, texts: list[str], max_length: int, pad_to: int | None) -> Any:
    """The plain transformers call encode() used to make (and still makes for slow tokenizers)."""
    enc = tokenizer(
        texts,
        padding="max_length" if pad_to else "longest",
        truncation=True,
        max_length=pad_to or max_length,
        return_tensors="np",
    )
    return {k: np.asarray(enc[k], dtype=np.int64) for k in KEYS}


@pytest.mark.parametrize(("max_length", "pad_to"), [(16, None), (64, None), (256, None), (32, 32)])
def test_encode_matches_the_transformers_call(
    random_model_dir: Path, small_splits: Splits, max_length: int, pad_to: int | None
) -> None:
    tok = load_tokenizer(random_model_dir)
    texts = read_tsv(small_splits.test).texts
    # Real review text, with odd cases mixed in: Latin letters to lower-case,
    # unknown characters, spaces, and sentences cut by truncation.
    texts = ["Hello 世界 ABC", "  前后有空格  ", "☃ 未知字符 ⛄", *texts]
    assert max(len(t) for t in texts) > 64  # truncation really happens at 16 and 64
    for size in (1, 3, 32):
        for start in range(0, 200, size):
            batch = texts[start : start + size]
            got = encode(tok, batch, max_length, pad_to=pad_to)
            want = _reference(tok, batch, max_length, pad_to)
            for key in KEYS:
                assert got[key].dtype == np.int64
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} at {start}")
    # The tokenizer's own settings are untouched: a plain call still pads nothing.
    assert len(tok(["一", "一二三"])["input_ids"][0]) == 3


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_of_tokenize_is_encode(
    random_model_dir: Path, small_splits: Splits, side: str
) -> None:
    """Serving's path (tokenize per request, pad per batch) gives the same arrays as encode()."""
    tok = load_tokenizer(random_model_dir)
    tok.padding_side = side
    texts = ["Hello 世界 ABC", "☃ 未知字符 ⛄", *read_tsv(small_splits.test).texts[:120]]
    for max_length in (16, 128):
        tokens = tokenize(tok, texts, max_length)
        assert all(len(t.ids) == len(t.type_ids) <= max_length for t in tokens)
        plain = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        assert token_lengths(tok, texts, max_length) == [len(ids) for ids in plain]
        for size in (1, 5, 32):
            for start in range(0, len(texts), size):
                got = collate(tok, tokens[start : start + size])
                want = encode(tok, texts[start : start + size], max_length)
                for key in KEYS:
                    assert got[key].dtype == np.int64
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} {start}")


def test_encode_on_a_fresh_char_tokenizer() -> None:
    """A tokenizer built in memory (never saved) goes through the same path."""
    tok = make_char_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "好", "坏"])
    got = encode(tok, ["好好", "坏"], 8)
    np.testing.assert_array_equal(got["input_ids"], [[2, 5, 5, 3], [2, 6, 3, 0]])
    np.testing.assert_array_equal(got["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(got["token_type_ids"], np.zeros((2, 4)))
    again = collate(tok, tokenize(tok, ["好好", "坏"], 8))
    for key in KEYS:
        np.testing.assert_array_equal(again[key], got[key])


def test_wordpiece_vocab_survives_a_save_and_reload(tmp_path: Path, small_splits: Splits) -> None:
    """A learned WordPiece tokenizer keeps multi-character pieces, and encode()
    gives the same ids after save_pretrained / AutoTokenizer (serving's path)."""
    from pipeline.preprocess import make_scratch_tokenizer

    texts = read_tsv(small_splits.train).texts
    tok = make_scratch_tokenizer(texts, "wordpiece")
    pieces = [t for t in tok.get_vocab() if len(t.removeprefix("##")) > 1]
    assert len(pieces) > 100  # words, not just characters
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    sample = texts[:50]
    a, b = encode(tok, sample, 64), encode(again, sample, 64)
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    # Fewer tokens per sentence than one per character (what max_length buys).
    chars = make_scratch_tokenizer(texts, "char")
    assert a["attention_mask"].sum() < encode(chars, sample, 64)["attention_mask"].sum()
    unk = int((a["input_ids"] == tok.unk_token_id).sum())
    assert unk == 0


def test_unknown_vocab_is_refused() -> None:
    from pipeline.preprocess import make_scratch_tokenizer

    with pytest.raises(ValueError, match="unknown vocab"):
        make_scratch_tokenizer(["好"], "bigram")
