"""Checkpoint and resume: a run stopped and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoint import FILE, Checkpointer
from pipeline.common import JobCancelled
from pipeline.corpus import Splits
from pipeline.data import Examples, read_tsv
from pipeline.train import fine_tune, set_seed

KW: dict[str, Any] = dict(batch_size=16, learning_rate=5e-4, max_length=32, seed=7, device="cpu")


def _data(splits: Splits) -> tuple[Examples, Examples]:
    train, dev = read_tsv(splits.train), read_tsv(splits.dev)
    return Examples(train.texts[:160], train.labels[:160]), Examples(
        dev.texts[:48], dev.labels[:48]
    )


def _fresh(random_model_dir: Path) -> tuple[Any, Any]:
    from pipeline.modeling import load_model
    from pipeline.preprocess import load_tokenizer

    set_seed(0)
    return load_model(random_model_dir), load_tokenizer(random_model_dir)


def _stop_at(stage: str) -> Any:
    def progress(fraction: float, current: str | None = None) -> None:
        if current == stage:
            raise JobCancelled("killed")

    return progress


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize(
    ("every_seconds", "stop_stage", "epoch", "mid_epoch"),
    [(None, "train epoch 2/2", 1, False), (0.0, "evaluate epoch 1/2", 0, True)],
    ids=["after-epoch", "mid-epoch"],
)
def test_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path,
    small_splits: Splits,
    random_model_dir: Path,
    every_seconds: float | None,
    stop_stage: str,
    epoch: int,
    mid_epoch: bool,
) -> None:
    train, dev = _data(small_splits)
    model, tok = _fresh(random_model_dir)
    plain = fine_tune(model, tok, train, dev, epochs=2, **KW)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = Checkpointer(tmp_path / "ckpt", every_seconds=every_seconds)
    model, tok = _fresh(random_model_dir)
    with pytest.raises(JobCancelled):
        fine_tune(
            model, tok, train, dev, epochs=2, progress=_stop_at(stop_stage), **KW, checkpoint=ckpt
        )
    assert (tmp_path / "ckpt" / FILE).is_file()
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name != FILE]  # no temp file left

    # A new process would start from a fresh model: the checkpoint brings it back.
    model, tok = _fresh(random_model_dir)
    resumed = fine_tune(
        model, tok, train, dev, epochs=2, **KW, checkpoint=Checkpointer(ckpt.folder)
    )
    assert resumed["resumed_from_epoch"] == epoch
    assert (resumed["resumed_from_batch"] > 0) is mid_epoch
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["best_epoch"] == plain["best_epoch"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert resumed["history"][-1]["train_loss"] == pytest.approx(plain["history"][-1]["train_loss"])


def test_unreadable_checkpoint_is_ignored(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"half a file")
    assert Checkpointer(tmp_path).load() is None


def test_resumed_train_keeps_the_first_attempts_vocabulary(
    tmp_path: Path, small_splits: Splits
) -> None:
    """The WordPiece vocabulary is learned once per job: a resumed attempt reuses it."""
    import json

    from pipeline.preprocess import VOCAB_FILE
    from pipeline.train import train

    kw: dict[str, Any] = dict(epochs=2, batch_size=16, max_length=32, device="cpu", threads=1)
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(JobCancelled):
        train(
            small_splits.train,
            tmp_path / "a",
            progress=_stop_at("train epoch 2/2"),
            checkpoint=ckpt,
            **kw,
        )
    pinned = json.loads((ckpt.folder / VOCAB_FILE).read_text(encoding="utf-8"))["tokens"]

    resumed = train(small_splits.train, tmp_path / "b", checkpoint=Checkpointer(ckpt.folder), **kw)
    assert resumed.metrics["resumed_from_epoch"] == 1
    vocab = resumed.tokenizer.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == pinned
