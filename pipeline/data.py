"""The seed's TSV format: ``index<TAB>sentence<TAB>label``, UTF-8.

:func:`parse_tsv` validates a whole file and either returns every row or
raises :class:`TSVError` naming the first bad line and the problem.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HEADER = ("index", "sentence", "label")


class TSVError(ValueError):
    """A dataset file that does not follow the format; ``line`` is 1-based (0: whole file)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{problem}")


@dataclass
class Examples:
    """The rows of a parsed dataset file: ``texts[i]`` has class id ``labels[i]``.

    (A *Dataset* is the uploaded file's database row, :class:`textcls.models.Dataset`.)
    """

    texts: list[str]
    labels: list[int]
    indices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Labels are class ids, so the model needs max(label) + 1 outputs."""
        return max(self.labels) + 1 if self.labels else 0

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {str(k): counts[k] for k in sorted(counts)}


def parse_tsv(data: bytes, *, max_bytes: int | None = None) -> Examples:
    """Parse and validate a dataset file's bytes."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TSVError(0, f"file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if not data.strip():
        raise TSVError(0, "file is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    texts: list[str] = []
    labels: list[int] = []
    indices: list[str] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TSVError(lineno, f"invalid UTF-8 at byte {exc.start}") from None
        cols = line.split("\t")
        if lineno == 1:
            if tuple(c.strip().lower() for c in cols) != HEADER:
                raise TSVError(
                    1, f"header must be 'index<TAB>sentence<TAB>label', got {line[:80]!r}"
                )
            continue
        if line.strip() == "":
            # Blank lines carry nothing; tolerate them rather than fail a big upload.
            continue
        if len(cols) != 3:
            raise TSVError(lineno, f"expected 3 tab-separated columns, got {len(cols)}")
        index, sentence, label = cols
        if not sentence.strip():
            raise TSVError(lineno, "empty sentence")
        label = label.strip()
        if not label.isascii() or not label.isdigit():
            raise TSVError(lineno, f"label must be a non-negative integer, got {label[:40]!r}")
        value = int(label)
        if value > 100_000:
            raise TSVError(lineno, f"label {value} is implausibly large (limit 100000)")
        texts.append(sentence.strip())
        labels.append(value)
        indices.append(index.strip())
    if not texts:
        raise TSVError(0, "file has a header but no rows")
    return Examples(texts=texts, labels=labels, indices=indices)


def read_tsv(path: Path) -> Examples:
    return parse_tsv(Path(path).read_bytes())


def write_tsv(path: Path, texts: list[str], labels: list[int]) -> None:
    """Write rows in the seed's format (tabs and newlines in text become spaces)."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(HEADER) + "\n")
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            clean = " ".join(text.replace("\t", " ").split())
            f.write(f"{i}\t{clean}\t{int(label)}\n")
