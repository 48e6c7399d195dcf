"""A model's download: its folder as a streamed ``.tar.gz`` with a model card.

The card (``README.md`` in the archive) says where the model came from (its
lineage and the job parameters of each step), how it scored (every
evaluation, per class by name), what its classes are called, and how to load
it without textcls: plain transformers for a PyTorch folder, plain
onnxruntime and tokenizers for an ONNX one. A pruned PyTorch folder uses
textcls's own architecture, which transformers cannot build; its card says so
and names what loads it.

The archive is written as it is sent (tar headers and file blocks through one
gzip stream), a block at a time, so memory does not grow with the model.
"""

from __future__ import annotations

import json
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from textcls.jobs import user_params
from textcls.labels import names_or_ids
from textcls.models import Dataset, Evaluation, Job, Model

CARD_NAME = "README.md"
# The model_type of textcls's pruned BERT (pipeline/pruned_bert.py), which
# transformers does not know.
PRUNED_MODEL_TYPE = "textcls_pruned_bert"
_BLOCK = 512
_READ = 1 << 20


def archive_name(model: Model) -> str:
    return f"model-{model.id}"


# --------------------------------------------------------------------------- card


def _ancestors(session: Session, model: Model) -> list[Model]:
    """The model and its ancestors, root first."""
    chain: list[Model] = []
    seen: set[int | None] = set()
    cur: Model | None = model
    while cur is not None and cur.id not in seen:
        seen.add(cur.id)
        chain.insert(0, cur)
        cur = session.get(Model, cur.parent_id) if cur.parent_id is not None else None
    return chain


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _lineage_lines(session: Session, model: Model) -> list[str]:
    lines = ["| model | format | made by | parameters |", "|---|---|---|---|"]
    for m in _ancestors(session, model):
        job = session.get(Job, m.job_id) if m.job_id is not None else None
        made = f"job {job.id} ({job.kind})" if job is not None else "-"
        params = json.dumps(user_params(job.params), ensure_ascii=False) if job else "-"
        lines.append(f"| {m.id} `{m.name}` | {m.format} | {made} | `{params}` |")
    return lines


def _evaluation_lines(session: Session, model: Model) -> list[str]:
    stmt = select(Evaluation).where(Evaluation.model_id == model.id).order_by(col(Evaluation.id))
    evals = list(session.exec(stmt))
    if not evals:
        return ["Not evaluated yet (submit an `evaluate` job)."]
    lines: list[str] = []
    for ev in evals:
        m = ev.metrics or {}
        ds = session.get(Dataset, ev.dataset_id)
        lat = m.get("latency_ms") or {}
        lines += [
            f"### dataset {ev.dataset_id} `{ds.name if ds else '?'}` ({m.get('rows')} rows)",
            "",
            f"accuracy {_pct(m.get('accuracy'))}, macro-F1 {_pct(m.get('macro_f1'))}, "
            f"latency p50 {_num(lat.get('p50'))} ms (batch 1), throughput "
            f"{_num(m.get('throughput_per_s'))} sentences/s (batch "
            f"{m.get('throughput_batch_size')}), on {m.get('device')}",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, c in (m.get("per_class") or {}).items():
            lines.append(
                f"| {name} | {_pct(c.get('precision'))} | {_pct(c.get('recall'))} | "
                f"{_pct(c.get('f1'))} | {c.get('support')} |"
            )
        lines.append("")
    return lines


def _pct(x: Any) -> str:
    return f"{x * 100:.2f}%" if isinstance(x, int | float) else "-"


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, int | float) else "-"


ONNX_SNIPPET = """```python
import json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

meta = json.load(open("textcls.json"))          # max_length, label_names
names = meta.get("label_names") or [str(i) for i in range(meta["num_labels"])]
tok = Tokenizer.from_file("tokenizer.json")
tok.enable_truncation(max_length=meta["max_length"])
tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])

texts = ["这个东西很好", "太差了"]
enc = tok.encode_batch(texts)
inputs = {
    "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
}
feed = {i.name: inputs[i.name] for i in session.get_inputs()}
logits = session.run(["logits"], feed)[0]
z = np.exp(logits - logits.max(axis=1, keepdims=True))
probs = z / z.sum(axis=1, keepdims=True)
ids = probs.argmax(axis=1)
print([(names[i], float(probs[n, i])) for n, i in enumerate(ids)])
```"""

PYTORCH_SNIPPET = """```python
import json
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

max_length = json.load(open("textcls.json"))["max_length"]
tok = AutoTokenizer.from_pretrained(".")
model = AutoModelForSequenceClassification.from_pretrained(".").eval()
batch = tok(["这个东西很好", "太差了"], padding=True, truncation=True,
            max_length=max_length, return_tensors="pt")
with torch.no_grad():
    probs = model(**batch).logits.softmax(-1)
print([model.config.id2label[int(i)] for i in probs.argmax(-1)])
```"""


def _how_to_load(model: Model, config: dict[str, Any]) -> list[str]:
    if model.format != "pytorch":
        return [
            f"An ONNX graph (`model.onnx`, {model.format}) with int64 inputs `input_ids`, "
            "`attention_mask`, `token_type_ids` `[batch, sequence]` and float32 output "
            "`logits` `[batch, num_labels]`. Plain onnxruntime and the tokenizer in this "
            "folder give the inference worker's answers:",
            "",
            ONNX_SNIPPET,
        ]
    if config.get("model_type") == PRUNED_MODEL_TYPE:
        return [
            f"**Plain transformers cannot load this folder.** It is a pruned BERT "
            f"(`model_type` `{PRUNED_MODEL_TYPE}`): its layers keep different numbers of "
            "attention heads and FFN widths, which `BertConfig` cannot express. textcls loads "
            "it: `pipeline.modeling.load_model(folder)` (or `pipeline.runtime.load_predictor`), "
            "which registers the architecture from `pipeline/pruned_bert.py` with "
            "transformers' Auto classes. To use it without textcls, export it (an `export` "
            "job) and download the ONNX model, which plain onnxruntime runs.",
        ]
    return [
        "A standard Hugging Face folder (safetensors); `config.json` carries `id2label`, "
        "so plain transformers shows the class names:",
        "",
        PYTORCH_SNIPPET,
    ]


def model_card(session: Session, model: Model, folder: Path) -> str:
    """The ``README.md`` of a model's download."""
    config = _read_json(folder / "config.json")
    meta = _read_json(folder / "textcls.json")
    names = names_or_ids(model.label_names, model.num_labels)
    named = "from the training data" if model.label_names else "plain class ids (no names)"
    lines = [
        f"# {model.name} (textcls model {model.id})",
        "",
        f"Format **{model.format}**, {model.num_labels} labels, {model.size_bytes} bytes, "
        f"max_length {meta.get('max_length', '?')}, registered {model.created_at:%Y-%m-%d %H:%M} "
        "UTC.",
        "",
        "## Labels",
        "",
        f"Names {named}:",
        "",
        "| id | name |",
        "|---|---|",
        *(f"| {i} | {n} |" for i, n in enumerate(names)),
        "",
        "## Lineage and parameters",
        "",
        "Root first; each row's parameters are those of the job that made it.",
        "",
        *_lineage_lines(session, model),
        "",
        "## Evaluations",
        "",
        *_evaluation_lines(session, model),
        "",
        "## How to load it",
        "",
        *_how_to_load(model, config),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- archive


def _header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def stream_tar_gz(root: str, folder: Path, extra: dict[str, bytes]) -> Iterator[bytes]:
    """A ``.tar.gz`` of ``folder``'s files (under ``root/``) plus ``extra`` files, in chunks."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    now = time.time()
    for name, data in extra.items():
        yield z.compress(_header(f"{root}/{name}", len(data), now) + data + _padding(len(data)))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in extra:
            continue
        stat = path.stat()
        yield z.compress(_header(f"{root}/{rel}", stat.st_size, stat.st_mtime))
        with path.open("rb") as f:
            while chunk := f.read(_READ):
                yield z.compress(chunk)
        yield z.compress(_padding(stat.st_size))
    yield z.compress(b"\0" * (2 * _BLOCK))
    yield z.flush()
