"""The pretrain job kind through the real stack: MLM on uploads, train on it by id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.corpus import Splits
from pipeline.data import read_tsv
from tests.stack import Stack

SMALL = {"max_length": 48, "batch_size": 32}


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    s = make_stack("sqlite")
    s.start_api()
    s.start_worker()
    return s


def test_pretrain_then_train_on_it_by_id(stack: Stack, job_splits: Splits, tmp_path: Path) -> None:
    texts = read_tsv(job_splits.test).texts
    plain = tmp_path / "sentences.tsv"
    plain.write_text(
        "index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)),
        encoding="utf-8",
    )
    unlabelled = stack.upload(plain)
    train_ds = stack.upload(job_splits.train)
    dev = stack.upload(job_splits.dev)
    assert unlabelled["labelled"] is False

    r = stack.http.post(
        "/jobs", json={"kind": "pretrain", "params": {"dataset_ids": [unlabelled["id"], 999999]}}
    )
    assert r.status_code == 422 and "dataset 999999 does not exist" in r.text, r.text

    job = stack.wait_job(
        stack.submit("pretrain", dataset_ids=[unlabelled["id"], train_ds["id"]], epochs=1, **SMALL)[
            "id"
        ]
    )
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["queue"] == "gpu"
    assert len(job["metrics"]["history"]) == 1 and job["metrics"]["mlm_loss"] > 0
    mlm_id = job["output_model_id"]
    mlm = stack.http.get(f"/models/{mlm_id}").json()
    assert mlm["num_labels"] == 0 and mlm["info"]["task"] == "masked-lm"

    tuned = stack.wait_job(
        stack.submit(
            "train",
            dataset_id=train_ds["id"],
            eval_dataset_id=dev["id"],
            base_model_id=mlm_id,
            epochs=1,
            **SMALL,
        )["id"]
    )
    assert tuned["status"] == "succeeded", (tuned, stack.logs())
    model = stack.http.get(f"/models/{tuned['output_model_id']}").json()
    assert model["parent_id"] == mlm_id and model["num_labels"] == 2

    # A masked LM is no classifier: exporting it fails, naming why.
    export = stack.wait_job(stack.submit("export", model_id=mlm_id)["id"])
    assert export["status"] == "failed" and "masked language model" in export["error"], export
