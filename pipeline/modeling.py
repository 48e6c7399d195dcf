"""Building, saving and loading the PyTorch models every step works on."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.contract import ModelMeta, id2label

log = logging.getLogger(__name__)

# From-scratch BERT presets. Heads are multiples of 3 and FFN widths multiples
# of 3 x 128 so the seed's pruning ratio (8 of 12 heads, 2048 of 3072 FFN)
# applies cleanly to each; every preset has more layers than the 3-layer student.
SCRATCH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, intermediate_size=384),
    "small": dict(
        num_hidden_layers=6, hidden_size=192, num_attention_heads=6, intermediate_size=768
    ),
    "base": dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072
    ),
}


def is_scratch(base_model: str) -> bool:
    return base_model.startswith("scratch:")


def scratch_config(preset: str, vocab_size: int, num_labels: int, max_length: int) -> Any:
    """A BertConfig for a from-scratch preset (``tiny``, ``small``, ``base``)."""
    from transformers import BertConfig

    if preset not in SCRATCH_PRESETS:
        raise ValueError(f"unknown scratch preset {preset!r}; known: {sorted(SCRATCH_PRESETS)}")
    # A preset may set its own dropout; BERT's 0.1 otherwise.
    kwargs: dict[str, Any] = {
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        **SCRATCH_PRESETS[preset],
    }
    # Eager attention exports to an ONNX graph that ONNX Runtime's BERT fusion
    # recognises; SDPA does not fuse.
    kwargs["attn_implementation"] = "eager"
    kwargs["num_labels"] = num_labels
    return BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(512, max_length),
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
        **kwargs,
    )


def register_architecture(model_dir: Path | str) -> None:
    """Register textcls's own architecture with transformers' Auto classes if the folder uses it.

    ``config.json`` names the folder's ``model_type``; one transformers does not
    know can only be textcls's pruned BERT (:mod:`pipeline.pruned_bert`, the one
    architecture textcls adds), which is then registered (idempotent). Call it
    before any ``Auto*.from_pretrained`` on a folder; :func:`load_model` and
    :func:`pipeline.preprocess.load_tokenizer` do.
    """
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return
    model_type = json.loads(config_path.read_text()).get("model_type")
    if not model_type:
        return
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return
    # Imported here rather than at the top for start-up time, not for a cycle
    # (pipeline.pruned_bert is a leaf): it loads transformers' BERT modelling
    # code (~2 s), which a process that only serves other folders (a plain
    # ONNX model, say) never needs.
    from pipeline.pruned_bert import register_pruned_bert

    register_pruned_bert()


def load_model(folder: Path | str, num_labels: int | None = None) -> Any:
    """A sequence-classification model from a folder, eager attention, no remote code."""
    from transformers import AutoModelForSequenceClassification

    # Pruned folders use textcls's own architecture (BERT with an explicit head size).
    register_architecture(folder)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "trust_remote_code": False}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)


def save_model_folder(model: Any, tokenizer: Any, out_dir: Path, meta: ModelMeta) -> Path:
    """Write a standard Hugging Face folder (safetensors) plus ``textcls.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = meta.names()
    if len(names) != int(meta.num_labels):
        raise ValueError(f"{len(names)} label names for {meta.num_labels} labels")
    # Plain transformers shows these names (pipeline("text-classification") too).
    model.config.id2label = id2label(names)
    model.config.label2id = {name: i for i, name in enumerate(names)}
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    meta.save(out_dir)
    return out_dir


def copy_tokenizer_and_meta(src: Path, dst: Path) -> None:
    """Copy everything but weights from one model folder to another (for ONNX variants)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in Path(src).iterdir():
        if p.is_file() and p.suffix not in {".safetensors", ".onnx", ".bin", ".data"}:
            shutil.copy2(p, dst / p.name)


def architecture(model: Any) -> dict[str, Any]:
    """Layer, head and FFN counts and parameter total, for records and comparisons."""
    cfg = model.config
    info: dict[str, Any] = {
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_heads": getattr(cfg, "num_attention_heads", None),
        "ffn_size": getattr(cfg, "intermediate_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return info
