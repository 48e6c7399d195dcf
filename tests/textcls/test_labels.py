"""Label-set rules, promotion across label sets and the pruned model's card, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session

from textcls.db import engine_for, migrate
from textcls.deployments import DeploymentRefused, promote
from textcls.labels import label_set_problem
from textcls.modelcard import model_card
from textcls.models import Dataset, Model
from textcls.store import ArtifactStore


def _ds(i: int, names: list[str] | None, n: int = 2, labelled: bool = True) -> Dataset:
    return Dataset(
        id=i, name="d", rows=1, num_labels=n, label_names=names, labelled=labelled,
        sha256="x", size_bytes=1, path=f"datasets/{i}.tsv",
    )  # fmt: skip


def _model(i: int, names: list[str] | None, n: int = 2) -> Model:
    return Model(
        id=i, name=f"m{i}", format="onnx", size_bytes=3, num_labels=n, label_names=names,
        path=f"models/{i}",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model_names", "ds", "fragment"),
    [
        (None, _ds(1, None), None),
        (None, _ds(1, None, n=1), None),  # an eval set with fewer classes
        (None, _ds(1, None, n=3), "labels up to 2"),
        (["neg", "pos"], _ds(1, ["neg", "pos"]), None),
        (["neg", "pos"], _ds(1, ["pos", "neg"]), "same names, same order"),
        (["neg", "pos"], _ds(1, None), "plain"),
        (None, _ds(1, ["neg", "pos"]), "plain"),
        (["neg", "pos"], _ds(1, None, n=0, labelled=False), "unlabelled"),
    ],
)
def test_label_set_problem(
    model_names: list[str] | None, ds: Dataset, fragment: str | None
) -> None:
    problem = label_set_problem(_model(7, model_names), ds)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


def _session_with_models(tmp_path: Path) -> tuple[Session, ArtifactStore]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    store = ArtifactStore(tmp_path / "artifacts")
    session = Session(engine_for(url))
    for model in (_model(1, None), _model(2, ["neg", "pos"]), _model(3, None)):
        folder = store.root / model.path
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"abc")
        session.add(model)
    session.commit()
    return session, store


def test_promotion_to_another_label_set_needs_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The artifact folder is a setting (no mock): promote() checks the folder is there.
    monkeypatch.setenv("TEXTCLS_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    from textcls.settings import get_settings

    get_settings.cache_clear()
    try:
        session, _ = _session_with_models(tmp_path)
        promote(session, session.get(Model, 1))
        session.commit()
        with pytest.raises(DeploymentRefused, match=r"\['neg', 'pos'\].*\['0', '1'\].*force"):
            promote(session, session.get(Model, 2))
        session.rollback()
        promote(session, session.get(Model, 3))  # same plain ids: fine
        session.commit()
        assert promote(session, session.get(Model, 2), force=True).recorded
    finally:
        get_settings.cache_clear()


def test_pruned_model_card_says_transformers_cannot_load_it(tmp_path: Path) -> None:
    session, store = _session_with_models(tmp_path)
    model = session.get(Model, 2)
    assert model is not None
    model.format = "pytorch"
    folder = store.root / model.path
    (folder / "config.json").write_text(json.dumps({"model_type": "textcls_pruned_bert"}))
    (folder / "textcls.json").write_text(json.dumps({"max_length": 48}))
    card = model_card(session, model, folder)
    assert "Plain transformers cannot load this folder" in card
    assert "pipeline.modeling.load_model" in card and "export" in card
    assert "| 0 | neg |" in card and "| 1 | pos |" in card
    assert "max_length 48" in card
