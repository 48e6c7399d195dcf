"""Test helpers: tiny real model folders and registering them in a stack's database."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.contract import ModelMeta
from tests.stack import Stack
from textcls.client import wait_ready

# Enough characters that the tokenizer knows most test sentences.
VOCAB_TEXT = "".join(
    [
        "这个东西很好用质量一般物流很慢客服态度也不好不会再买了",
        "太差了还可以一句两句话我们的产品非常喜欢",
    ]
)


def build_model_folder(out: Path, *, label: int, num_labels: int = 2, seed: int = 0) -> Path:
    """An untrained scratch:tiny BERT whose classifier bias makes it predict ``label``.

    Random weights give logits near zero, so a bias of +6 on one class makes
    every prediction that class with probability ~0.99: two such models are
    told apart by their answers alone.
    """
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.modeling import save_model_folder, scratch_config
    from pipeline.preprocess import build_char_vocab, make_char_tokenizer

    torch.manual_seed(seed)
    tok = make_char_tokenizer(build_char_vocab([VOCAB_TEXT]))
    cfg = scratch_config("tiny", vocab_size=len(tok), num_labels=num_labels, max_length=64)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        bias = torch.full((num_labels,), -3.0)
        bias[label] = 3.0
        model.classifier.bias.copy_(bias)
    meta = ModelMeta(format="pytorch", max_length=64, num_labels=num_labels)
    return save_model_folder(model, tok, out, meta)


def fake_model_folder(out: Path, num_labels: int = 2, fmt: str = "pytorch") -> Path:
    """A folder that passes the control plane's servability check (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    ModelMeta(format=fmt, max_length=64, num_labels=num_labels).save(out)
    return out


def register_model(
    stack: Stack,
    folder: Path | None,
    *,
    name: str,
    num_labels: int = 2,
    fmt: str = "pytorch",
    parent_id: int | None = None,
) -> int:
    """Write a Model row into the stack's database and copy ``folder`` into its store."""
    from sqlmodel import Session

    from textcls.db import engine_for
    from textcls.records import add_model
    from textcls.store import ArtifactStore

    store = ArtifactStore(stack.root / "artifacts")
    with store.staging() as tmp, Session(engine_for(stack.database_url)) as session:
        staged = None
        if folder is not None:
            staged = tmp / "m"
            shutil.copytree(folder, staged)
        row = add_model(
            session,
            store,
            staged,
            name=name,
            format=fmt,
            num_labels=num_labels,
            parent_id=parent_id,
        )
        session.commit()
        assert row.id is not None
        return row.id


def wait_serving(url: str, model_id: int, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the inference worker at ``url`` reports ``model_id`` ready."""
    return wait_ready(url, model_id, timeout)
