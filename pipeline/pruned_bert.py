"""The pruned-BERT architecture (``model_type`` ``textcls_pruned_bert``).

Why a registered architecture: transformers 5 dropped ``prune_heads`` and
``BertSelfAttention`` derives the head size as ``hidden_size //
num_attention_heads`` while ``BertSelfOutput`` is a square ``hidden x hidden``
projection, so "8 heads of 64 in a 768-wide model" cannot be expressed by any
``BertConfig`` (DeBERTa-v2's ``attention_head_size`` has the same square output
projection). :class:`PrunedBertConfig` adds ``attention_head_size``;
:class:`PrunedBertForSequenceClassification` is
``BertForSequenceClassification`` with its attention projections sized
``num_attention_heads * attention_head_size``, i.e. exactly the module shapes
the old ``prune_heads`` produced, running BERT's own forward code.

:func:`register_pruned_bert` registers both with ``AutoConfig`` /
``AutoModel*`` (the documented way to add a model type), after which
``AutoModelForSequenceClassification.from_pretrained`` loads pruned folders.
:func:`pipeline.modeling.load_model` and
:func:`pipeline.preprocess.load_tokenizer` call it for pruned folders; other
code that loads one with the Auto classes calls it first.

A leaf module: it imports torch and transformers only, nothing from the project.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

PRUNED_MODEL_TYPE = "textcls_pruned_bert"


@strict
class PrunedBertConfig(BertConfig):
    """``BertConfig`` plus an explicit per-head width (``None``: hidden // heads)."""

    model_type = PRUNED_MODEL_TYPE

    attention_head_size: int | None = None


def _head_size(config: Any) -> int:
    size = getattr(config, "attention_head_size", None)
    return int(size) if size else int(config.hidden_size // config.num_attention_heads)


def _build_with_pruned_attention(
    init: Callable[[], None], config: Any, bert: Callable[[], Any]
) -> None:
    """Run a BERT ``__init__`` and then give every layer pruned-size attention projections.

    ``BertSelfAttention.__init__`` refuses head counts that do not divide the
    hidden size, so the stock modules are built with one head and replaced.
    """
    heads = int(config.num_attention_heads)
    size = _head_size(config)
    config.num_attention_heads = 1
    try:
        init()
    finally:
        config.num_attention_heads = heads
    hidden = int(config.hidden_size)
    for layer in bert().encoder.layer:
        sa = layer.attention.self
        sa.num_attention_heads = heads
        sa.attention_head_size = size
        sa.all_head_size = heads * size
        sa.scaling = size**-0.5
        sa.query = nn.Linear(hidden, heads * size)
        sa.key = nn.Linear(hidden, heads * size)
        sa.value = nn.Linear(hidden, heads * size)
        layer.attention.output.dense = nn.Linear(heads * size, hidden)


class PrunedBertModel(BertModel):
    """``BertModel`` with ``num_attention_heads`` heads of ``attention_head_size`` each."""

    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig, add_pooling_layer: bool = True) -> None:
        _build_with_pruned_attention(
            lambda: BertModel.__init__(self, config, add_pooling_layer), config, lambda: self
        )
        self.post_init()


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` over :class:`PrunedBertModel`-shaped layers."""

    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig) -> None:
        _build_with_pruned_attention(
            lambda: BertForSequenceClassification.__init__(self, config), config, lambda: self.bert
        )
        self.post_init()


def register_pruned_bert() -> None:
    """Make ``Auto*.from_pretrained`` recognise ``textcls_pruned_bert`` folders (idempotent)."""
    AutoConfig.register(PRUNED_MODEL_TYPE, PrunedBertConfig, exist_ok=True)
    AutoModel.register(PrunedBertConfig, PrunedBertModel, exist_ok=True)
    AutoModelForSequenceClassification.register(
        PrunedBertConfig, PrunedBertForSequenceClassification, exist_ok=True
    )


__all__ = [
    "PRUNED_MODEL_TYPE",
    "PrunedBertConfig",
    "PrunedBertForSequenceClassification",
    "PrunedBertModel",
    "register_pruned_bert",
]
