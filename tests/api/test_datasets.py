"""Dataset upload validation through the real API process, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
        (b"index\tsentence\n0\thi\n", 422, ["line 1", "header"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\tbad\n", 422, ["line 3", "3 tab-separated"]),
        (b"index\tsentence\tlabel\n0\tgood\t1\n1\t  \t0\n", 422, ["line 3", "empty sentence"]),
        (b"index\tsentence\tlabel\n0\tgood\tpositive\n", 422, ["line 2", "integer"]),
        (b"index\tsentence\tlabel\n0\tgood\t-1\n", 422, ["line 2", "integer"]),
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
        "label-word",
        "label-negative",
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
