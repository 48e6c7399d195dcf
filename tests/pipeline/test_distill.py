"""Distillation with TextBrewer into an rbt3-style student."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.checkpoint import FILE, Checkpointer
from pipeline.common import JobCancelled, StepError
from pipeline.contract import ModelMeta
from pipeline.corpus import Splits
from pipeline.data import read_tsv, write_tsv
from pipeline.distill import DistillResult, distill, layer_map, student_from_teacher
from pipeline.modeling import load_model
from pipeline.preprocess import encode, load_tokenizer
from pipeline.prune import prune
from pipeline.pruned_bert import PrunedBertForSequenceClassification

MAX_LENGTH = 64  # the trained fixture's


def _logits(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = encode(tokenizer, texts[i : i + 64], MAX_LENGTH)
            out.append(model.eval()(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits)
    return np.asarray(torch.cat(out).numpy())


def _predictions(folder: Path, texts: list[str]) -> np.ndarray:
    return _logits(load_model(folder), load_tokenizer(folder), texts).argmax(axis=1)


@pytest.fixture(scope="module")
def train_subset(small_splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 rows of the training split: enough to distil, small enough for 2 shared cores."""
    data = read_tsv(small_splits.train)
    path = tmp_path_factory.mktemp("distill_data") / "train400.tsv"
    write_tsv(path, data.texts[:400], data.labels[:400])
    return path


@pytest.fixture(scope="module")
def rows96(small_splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 dev rows, for the runs that only need to work, not to learn."""
    data = read_tsv(small_splits.dev)
    path = tmp_path_factory.mktemp("distill_data") / "rows96.tsv"
    write_tsv(path, data.texts[:96], data.labels[:96])
    return path


@pytest.fixture(scope="module")
def distilled(
    trained_tiny_model: Path,
    train_subset: Path,
    small_splits: Splits,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[DistillResult, list[tuple[float, str | None]]]:
    calls: list[tuple[float, str | None]] = []
    result = distill(
        trained_tiny_model,
        train_subset,
        tmp_path_factory.mktemp("distilled") / "model",
        eval_tsv=small_splits.dev,
        epochs=2,
        max_length=MAX_LENGTH,
        progress=lambda f, s=None: calls.append((f, s)),
    )
    return result, calls


def test_layer_map_is_even_with_embeddings_matched() -> None:
    assert layer_map(12, 3) == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert layer_map(4, 3) == [(0, 0), (1, 1), (2, 3), (3, 4)]
    assert layer_map(6, 2) == [(0, 0), (1, 3), (2, 6)]


def test_student_is_initialised_from_the_teacher_like_rbt3(trained_tiny_model: Path) -> None:
    teacher = load_model(trained_tiny_model)
    student = student_from_teacher(teacher, 3)
    assert student.config.num_hidden_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert not any(".layer.3." in k for k in s_state)
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key  # embeddings, layers 0-2, pooler, head
    with pytest.raises(StepError, match="student_layers"):
        student_from_teacher(teacher, 4)


def test_student_is_a_smaller_standard_folder(
    distilled: tuple[DistillResult, list[tuple[float, str | None]]], trained_tiny_model: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    result, _ = distilled
    m = result.metrics
    teacher_cfg = json.loads((trained_tiny_model / "config.json").read_text())
    cfg = json.loads((result.model_dir / "config.json").read_text())
    assert cfg["model_type"] == "bert"
    assert cfg["num_hidden_layers"] == 3 < teacher_cfg["num_hidden_layers"]
    assert len(cfg["id2label"]) == len(teacher_cfg["id2label"]) == 2
    assert (m["student_layers"], m["teacher_layers"]) == (3, 4)
    assert m["student_parameters"] < m["teacher_parameters"]
    assert m["num_labels"] == 2
    assert m["hidden_match"] is True
    assert m["layer_map"][0] == {"student": 0, "teacher": 0}
    assert len(m["history"]) == 2 and m["best_epoch"] in (1, 2)
    meta = ModelMeta.load(result.model_dir)
    assert (meta.format, meta.num_labels) == ("pytorch", 2)
    assert meta.extra["distilled_from"]
    # Reloads with plain transformers and gives the in-memory student's logits.
    sample = ["物流很快，质量也好", "太差了，再也不买了", "一般般吧"]
    auto = AutoModelForSequenceClassification.from_pretrained(str(result.model_dir))
    np.testing.assert_allclose(
        _logits(auto, load_tokenizer(result.model_dir), sample),
        _logits(result.model, result.tokenizer, sample),
        atol=1e-5,
    )
    # TextBrewer wrote no checkpoints next to the student nor into the working directory.
    assert not list(result.model_dir.glob("*.pkl"))
    assert not Path("saved_models").exists()


def test_progress_is_reported_per_batch(
    distilled: tuple[DistillResult, list[tuple[float, str | None]]],
) -> None:
    _, calls = distilled
    fractions = [f for f, _ in calls]
    assert fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    # 400 rows / 32 per batch = 13 batches per epoch, each reported.
    assert sum(1 for _, s in calls if s and s.startswith("distill epoch")) >= 2 * 13


def test_student_beats_chance_on_the_unseen_test_split(
    distilled: tuple[DistillResult, list[tuple[float, str | None]]],
    trained_tiny_model: Path,
    small_splits: Splits,
) -> None:
    result, _ = distilled
    data = read_tsv(small_splits.test)
    student = _predictions(result.model_dir, data.texts)
    teacher = _predictions(trained_tiny_model, data.texts)
    labels = np.asarray(data.labels)
    student_acc = float((student == labels).mean())
    teacher_acc = float((teacher == labels).mean())
    # Measured: the fixture teacher scores 0.615 on these 400 balanced rows, the
    # student 0.61-0.625 and agrees with it on ~98% of them. Chance is 0.5 with a
    # standard error of 0.025, so 0.57 is clearly above it with room for noise.
    assert student_acc >= 0.57, (student_acc, teacher_acc)
    assert float((student == teacher).mean()) >= 0.85


def test_distilling_a_pruned_teacher(
    trained_tiny_model: Path, rows96: Path, tmp_path: Path
) -> None:
    pruned = prune(trained_tiny_model, rows96, tmp_path / "pruned", max_length=MAX_LENGTH)
    result = distill(
        pruned.model_dir,
        rows96,
        tmp_path / "student",
        epochs=1,
        max_length=MAX_LENGTH,
    )
    student = load_model(result.model_dir)
    assert isinstance(student, PrunedBertForSequenceClassification)
    assert student.config.num_hidden_layers == 3
    assert student.config.num_attention_heads == 4
    assert student.config.intermediate_size == 256
    assert result.metrics["student_parameters"] < pruned.metrics["parameters_after"]
    assert 0.0 <= result.metrics["student_eval_accuracy"] <= 1.0


def test_non_pytorch_teacher_is_refused(
    trained_tiny_model: Path, small_splits: Splits, tmp_path: Path
) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(trained_tiny_model, folder)
    meta = ModelMeta.load(folder)
    meta.format = "onnx"
    meta.save(folder)
    with pytest.raises(StepError, match="distill needs a pytorch model, got onnx"):
        distill(folder, small_splits.dev, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cancellation_stops_training(
    trained_tiny_model: Path, rows96: Path, tmp_path: Path
) -> None:
    stages: list[str | None] = []

    def progress(fraction: float, stage: str | None = None) -> None:
        stages.append(stage)
        if stage and stage.startswith("distill epoch") and len(stages) > 8:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        distill(
            trained_tiny_model,
            rows96,
            tmp_path / "out",
            epochs=3,
            batch_size=8,
            hidden_match=False,
            max_length=MAX_LENGTH,
            progress=progress,
        )
    assert not (tmp_path / "out").exists()
    # Stopped in the first epoch, without running the rest.
    assert stages[-1] == "distill epoch 1/3"


RESUME_KW: dict[str, Any] = dict(
    epochs=2, batch_size=16, max_length=MAX_LENGTH, seed=3, device="cpu"
)


def _stop_at(stage: str, nth: int) -> Any:
    """A progress callback that cancels the job at the ``nth`` report of ``stage``."""
    seen = 0

    def progress(fraction: float, current: str | None = None) -> None:
        nonlocal seen
        if current == stage:
            seen += 1
            if seen == nth:
                raise JobCancelled("killed")

    return progress


@pytest.fixture(scope="module")
def uninterrupted(
    trained_tiny_model: Path, rows96: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DistillResult, dict[str, torch.Tensor]]:
    """A run that is never stopped, and the student its last checkpoint holds (epoch 2's)."""
    folder = tmp_path_factory.mktemp("distill_plain")
    ckpt = Checkpointer(folder / "ckpt")
    result = distill(trained_tiny_model, rows96, folder / "model", checkpoint=ckpt, **RESUME_KW)
    saved = ckpt.load()
    assert saved is not None and saved["epochs_done"] == 2
    return result, saved["model"]


@pytest.mark.parametrize(
    ("every_seconds", "stop_stage", "nth", "epoch", "batch"),
    [
        (None, "distill epoch 2/2", 1, 1, 0),
        (0.0, "distill epoch 2/2", 3, 1, 2),
        (0.0, "evaluate epoch 1", 1, 0, -1),  # -1: the epoch's last batch but one
    ],
    ids=["after-epoch", "mid-epoch", "mid-epoch-before-evaluation"],
)
def test_resumed_distillation_matches_an_uninterrupted_one(
    trained_tiny_model: Path,
    rows96: Path,
    tmp_path: Path,
    uninterrupted: tuple[DistillResult, dict[str, torch.Tensor]],
    every_seconds: float | None,
    stop_stage: str,
    nth: int,
    epoch: int,
    batch: int,
) -> None:
    plain, plain_last = uninterrupted
    batches_per_epoch = math.ceil(plain.metrics["train_rows"] / RESUME_KW["batch_size"])
    batch = batch % batches_per_epoch
    ckpt = Checkpointer(tmp_path / "ckpt", every_seconds=every_seconds)
    with pytest.raises(JobCancelled):
        distill(
            trained_tiny_model,
            rows96,
            tmp_path / "stopped",
            progress=_stop_at(stop_stage, nth),
            checkpoint=ckpt,
            **RESUME_KW,
        )
    assert not (tmp_path / "stopped").exists()
    assert [p.name for p in ckpt.folder.iterdir()] == [FILE]  # no temp file left

    # A new process: other random state, a fresh Checkpointer on the same folder.
    torch.manual_seed(12345)
    calls: list[float] = []
    again = Checkpointer(ckpt.folder)
    resumed = distill(
        trained_tiny_model,
        rows96,
        tmp_path / "resumed",
        progress=lambda f, s=None: calls.append(f),
        checkpoint=again,
        **RESUME_KW,
    )
    m = resumed.metrics
    assert (m["resumed_from_epoch"], m["resumed_from_batch"]) == (epoch, batch)
    assert m["resumed_from_step"] == epoch * batches_per_epoch + batch
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    for got, want in zip(m["history"], plain.metrics["history"], strict=True):
        assert got == pytest.approx(want)
    assert m["best_epoch"] == plain.metrics["best_epoch"]
    assert m["student_eval_accuracy"] == plain.metrics["student_eval_accuracy"]
    expected = plain.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    # The best epoch may be the first: the last checkpoint holds epoch 2's student.
    last = again.load()
    assert last is not None
    for key, value in last["model"].items():
        torch.testing.assert_close(value, plain_last[key], msg=key)
    assert calls == sorted(calls) and calls[-1] == 1.0
