"""Dataset upload validation through the real API process, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack

GOOD = "index\tsentence\tlabel\n0\t这个东西很好\t1\n1\t太差了\t0\n2\t还可以\t2\n"


@pytest.fixture
def stack(make_stack: Callable[..., Stack], backend: str) -> Stack:
    s = make_stack(backend, max_upload_bytes=4096)
    s.start_api()
    return s


def _post(stack: Stack, content: bytes, name: str | None = None) -> tuple[int, dict]:
    files = {"file": ("d.tsv", content, "text/tab-separated-values")}
    r = stack.http.post("/datasets", files=files, data={"name": name} if name else None)
    return r.status_code, r.json()


def _stored_files(stack: Stack) -> list[Path]:
    d = stack.root / "artifacts" / "datasets"
    return sorted(d.glob("*")) if d.exists() else []


def test_upload_good_dataset(stack: Stack) -> None:
    code, body = _post(stack, GOOD.encode(), name="reviews v1")
    assert code == 201, body
    assert body["rows"] == 3
    assert body["label_counts"] == {"0": 1, "1": 1, "2": 1}
    assert body["num_labels"] == 3
    assert body["name"] == "reviews v1"
    assert len(body["sha256"]) == 64
    got = stack.http.get(f"/datasets/{body['id']}").json()
    assert got["id"] == body["id"]
    assert [d["id"] for d in stack.http.get("/datasets").json()] == [body["id"]]
    assert len(_stored_files(stack)) == 1


def test_bom_and_crlf_accepted(stack: Stack) -> None:
    data = b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode()
    code, body = _post(stack, data)
    assert code == 201, body
    assert body["rows"] == 3


@pytest.mark.parametrize(
    ("content", "status", "fragments"),
    [
        (b"", 422, ["empty"]),
        (b"idx\tsentence\tlabel\n0\thi\t1\n", 422, ["line 1", "header"]),
        (b"index\tlabel\n0\t1\n", 422, ["line 1", "header"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\tbad\n", 422, ["line 3", "3 tab-separated"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\t  \t0\n", 422, ["line 3", "empty sentence"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\tbad\tpositive\n", 422, ["line 3", "integer"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\tbad\t-1\n", 422, ["line 3", "integer"]),
        (b"index\tsentence\tlabel\n0\tgood\tpos\x01\n", 422, ["line 2", "control"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\t\xff\xfe\t0\n", 422, ["line 3", "UTF-8"]),
        (b"index\tsentence\tlabel\n", 422, ["no rows"]),
        (GOOD.encode() * 200, 413, ["size limit"]),
    ],
    ids=[
        "empty",
        "wrong-header",
        "short-header",
        "columns",
        "empty-sentence",
        "label-word-among-ids",
        "label-negative-among-ids",
        "label-name-control-char",
        "utf8",
        "header-only",
        "too-big",
    ],
)
def test_bad_uploads_rejected_and_nothing_stored(
    stack: Stack, content: bytes, status: int, fragments: list[str]
) -> None:
    code, body = _post(stack, content)
    assert code == status, body
    for fragment in fragments:
        assert fragment in body["detail"], body
    assert stack.http.get("/datasets").json() == []
    assert _stored_files(stack) == []


def test_bad_name_and_missing_dataset(stack: Stack) -> None:
    code, body = _post(stack, GOOD.encode(), name="../../etc/passwd")
    assert code == 422
    assert "name" in body["detail"]
    assert stack.http.get("/datasets/999").status_code == 404
    assert _stored_files(stack) == []


NAMED = "index\tsentence\tlabel\n0\t这个东西很好\tpos\n1\t太差了\tneg\n2\t还行\tneu\n3\t很好\tpos\n"


def _post_named(
    stack: Stack, content: bytes, label_names: str | None
) -> tuple[int, dict[str, Any]]:
    files = {"file": ("d.tsv", content, "text/tab-separated-values")}
    data = {"label_names": label_names} if label_names is not None else None
    r = stack.http.post("/datasets", files=files, data=data)
    return r.status_code, r.json()


def test_label_names_get_sorted_ids_and_the_file_keeps_ids(stack: Stack) -> None:
    code, body = _post(stack, NAMED.encode())
    assert code == 201, body
    # Sorted by name: neg 0, neu 1, pos 2.
    assert body["label_names"] == ["neg", "neu", "pos"]
    assert body["label_counts"] == {"neg": 1, "neu": 1, "pos": 2}
    assert body["num_labels"] == 3 and body["labelled"] is True
    stored = _stored_files(stack)[0].read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[2] for line in stored[1:]] == ["2", "0", "1", "2"]
    assert body["size_bytes"] == _stored_files(stack)[0].stat().st_size


def test_label_names_field_orders_names_and_names_ids(stack: Stack) -> None:
    code, body = _post_named(stack, NAMED.encode(), json.dumps(["pos", "neu", "neg", "spam"]))
    assert code == 201, body
    assert body["label_names"] == ["pos", "neu", "neg", "spam"]
    assert body["num_labels"] == 4
    code, body = _post_named(stack, GOOD.encode(), json.dumps(["差", "好", "中"]))
    assert code == 201, body
    assert body["label_counts"] == {"差": 1, "好": 1, "中": 1}


BAD_LABEL_NAMES = [
    (GOOD, "not json", ["label_names", "JSON list"]),
    (GOOD, '{"a": 1}', ["label_names", "JSON list"]),
    (GOOD, '["a", "a", "b"]', ["label_names[1]", "twice"]),
    (GOOD, '["a", ""]', ["label_names[1]", "empty"]),
    (GOOD, "[]", ["label_names", "empty"]),
    (GOOD, '["a", "b"]', ["line 4", "out of range"]),
    (NAMED, '["pos", "neg"]', ["line 4", "'neu'", "not one of label_names"]),
    ("index\tsentence\n0\thi\n", '["a", "b"]', ["no label column"]),
]


def test_bad_label_names_rejected_and_nothing_stored(stack: Stack) -> None:
    # One API for every case: each must be refused on its own, storing nothing.
    for content, label_names, fragments in BAD_LABEL_NAMES:
        code, body = _post_named(stack, content.encode(), label_names)
        assert code == 422, (label_names, body)
        for fragment in fragments:
            assert fragment in body["detail"], (label_names, body)
    assert stack.http.get("/datasets").json() == []
    assert _stored_files(stack) == []


def test_unlabelled_text_upload(stack: Stack) -> None:
    content = "index\tsentence\r\na\t第一句\r\nb\t第二句\r\n".encode()
    code, body = _post(stack, content)
    assert code == 201, body
    assert body["labelled"] is False
    assert body["label_counts"] == {} and body["num_labels"] == 0 and body["rows"] == 2
    assert body["label_names"] is None
    code, body = _post(stack, b"index\tsentence\n0\t \n")
    assert code == 422 and "line 2" in body["detail"] and "empty sentence" in body["detail"]
