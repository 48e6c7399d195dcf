"""The model-folder contract: what every textcls model folder holds and says.

A model folder is a standard Hugging Face folder (``config.json`` with
``id2label``, the tokenizer files, the weights) plus :data:`META_FILE`, the
folder's :class:`ModelMeta`. ONNX formats keep their graph in
:data:`ONNX_FILE`, with int64 inputs :data:`MODEL_INPUTS` and the float32
output :data:`LOGITS` (``[batch, num_labels]``).

This module imports nothing from the project, so every step, the serving side
and the control plane can use it without pulling in another step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "textcls.json"
ONNX_FILE = "model.onnx"
LOGITS = "logits"
# What pipeline.preprocess.encode returns and every model (PyTorch or ONNX) takes, in this order.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

ONNX_FORMATS = ("onnx", "onnx-fp16", "onnx-int8")
FORMATS = ("pytorch", *ONNX_FORMATS)


@dataclass
class ModelMeta:
    """What every textcls model folder says about itself (in :data:`META_FILE`)."""

    format: str
    max_length: int
    num_labels: int
    extra: dict[str, Any] = field(default_factory=dict)
    # The name of each class id, where the training data named them (None: plain ids).
    label_names: list[str] | None = None

    def names(self) -> list[str]:
        """The name of every class id; an unnamed class is named by its id (``"0"``...)."""
        if self.label_names is not None:
            return list(self.label_names)
        return [str(i) for i in range(self.num_labels)]

    def with_format(self, fmt: str, extra: dict[str, Any]) -> ModelMeta:
        """The meta of a folder derived from this one (same labels and max length)."""
        return ModelMeta(fmt, self.max_length, self.num_labels, extra, self.label_names)

    def save(self, folder: Path) -> None:
        (Path(folder) / META_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ModelMeta:
        data = json.loads((Path(folder) / META_FILE).read_text())
        return cls(**data)


def id2label(names: list[str]) -> dict[int, str]:
    """``config.json``'s ``id2label`` for class names in id order."""
    return dict(enumerate(names))
