"""The seed's TSV format: ``index<TAB>sentence<TAB>label``, UTF-8; and unlabelled text.

A labelled file has the header ``index<TAB>sentence<TAB>label``. Its labels are
either all class ids (non-negative integers, the seed's format) or all class
*names* (any other non-empty strings). Names get ids in sorted order (Python's
code-point order of the strings): ``neg, neu, pos`` become ``0, 1, 2``. A
``label_names`` list, where given, fixes the names and their order instead: a
file of ids then names its classes by that list, and a file of names must use
names from it. An unlabelled file (for batch scoring and pretraining) has the
header ``index<TAB>sentence``.

:func:`parse_tsv` validates a whole file and either returns every row or
raises :class:`TSVError` naming the first bad line and the problem.
:func:`iter_rows` reads a stored file row by row (constant memory) for steps
that stream it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HEADER = ("index", "sentence", "label")
UNLABELLED_HEADER = ("index", "sentence")
MAX_LABEL_ID = 100_000
MAX_NAME_CHARS = 200


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

    ``labels`` is empty for an unlabelled file (``labelled`` False).
    ``label_names[i]`` names class ``i`` where the file or the upload named
    its classes; ``None`` for plain ids. (A *Dataset* is the uploaded file's
    database row, :class:`textcls.models.Dataset`.)
    """

    texts: list[str]
    labels: list[int]
    indices: list[str] = field(default_factory=list)
    label_names: list[str] | None = None
    labelled: bool = True
    # The label column held names (not ids): the stored copy needs the ids written out.
    names_in_file: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Named classes: one per name; plain ids: max(label) + 1 outputs."""
        if self.label_names is not None:
            return len(self.label_names)
        return max(self.labels) + 1 if self.labels else 0

    def names(self) -> list[str]:
        """The name of every class id (an unnamed class is named by its id)."""
        return label_names_or_ids(self.label_names, self.num_labels)

    def label_counts(self) -> dict[str, int]:
        """Rows per class, keyed by class name, in id order; empty when unlabelled."""
        counts = Counter(self.labels)
        names = self.names()
        return {names[k]: counts[k] for k in sorted(counts)}


def label_names_or_ids(names: Sequence[str] | None, num_labels: int) -> list[str]:
    """``names`` as a list, or the ids ``"0" .. str(num_labels - 1)`` where there are none."""
    return list(names) if names is not None else [str(i) for i in range(num_labels)]


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a class name, or None."""
    if not isinstance(name, str):
        return f"a label name must be a string, got {type(name).__name__}"
    if not name.strip():
        return "a label name must not be empty"
    if name != name.strip():
        return f"label name {name[:40]!r} has leading or trailing spaces"
    if len(name) > MAX_NAME_CHARS:
        return f"label name {name[:40]!r}... is over {MAX_NAME_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"label name {name[:40]!r} contains control characters"
    return None


def check_label_names(names: Sequence[object]) -> list[str]:
    """A valid, duplicate-free list of names (raises TSVError(0, ...) naming the problem)."""
    if not names:
        raise TSVError(0, "label_names must not be empty")
    if len(names) > MAX_LABEL_ID + 1:
        raise TSVError(0, f"label_names has {len(names)} names, over {MAX_LABEL_ID + 1}")
    seen: set[str] = set()
    for i, name in enumerate(names):
        problem = name_problem(name)
        if problem:
            raise TSVError(0, f"label_names[{i}]: {problem}")
        assert isinstance(name, str)
        if name in seen:
            raise TSVError(0, f"label_names[{i}]: {name!r} appears twice")
        seen.add(name)
    return [str(n) for n in names]


def _is_id(label: str) -> bool:
    return label.isascii() and label.isdigit()


def _split_row(raw: bytes, lineno: int, ncols: int) -> list[str] | None:
    """One data line's columns, validated; None for a blank line."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TSVError(lineno, f"invalid UTF-8 at byte {exc.start}") from None
    if line.strip() == "":
        # Blank lines carry nothing; tolerate them rather than fail a big upload.
        return None
    cols = line.split("\t")
    if len(cols) != ncols:
        raise TSVError(lineno, f"expected {ncols} tab-separated columns, got {len(cols)}")
    if not cols[1].strip():
        raise TSVError(lineno, "empty sentence")
    return [c.strip() for c in cols]


def _header_columns(raw: bytes) -> int:
    """3 for a labelled header, 2 for an unlabelled one (raises on anything else)."""
    line = raw.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r").decode("utf-8", errors="replace")
    cols = tuple(c.strip().lower() for c in line.split("\t"))
    if cols == HEADER:
        return 3
    if cols == UNLABELLED_HEADER:
        return 2
    raise TSVError(
        1,
        "header must be 'index<TAB>sentence<TAB>label' (or 'index<TAB>sentence' for "
        f"unlabelled text), got {line[:80]!r}",
    )


def _label_ids(
    raw_labels: list[tuple[int, str]], label_names: list[str] | None
) -> tuple[list[int], list[str] | None]:
    """Class ids of the raw labels (with their line numbers), and the class names."""
    first_id = next(((n, x) for n, x in raw_labels if _is_id(x)), None)
    first_name = next(((n, x) for n, x in raw_labels if not _is_id(x)), None)
    if first_id is not None and first_name is not None:
        lineno, name = max(first_id, first_name)
        other = min(first_id, first_name)
        raise TSVError(
            lineno,
            f"label {name[:40]!r} mixes with line {other[0]}'s {other[1][:40]!r}: labels must "
            "be all non-negative integer ids or all names",
        )
    if first_name is None:  # class ids
        ids: list[int] = []
        limit = len(label_names) - 1 if label_names is not None else MAX_LABEL_ID
        for lineno, label in raw_labels:
            value = int(label)
            if value > limit:
                what = f"label_names has {limit + 1} names" if label_names else "limit 100000"
                raise TSVError(lineno, f"label {value} is out of range ({what})")
            ids.append(value)
        return ids, label_names
    names = label_names
    if names is None:
        for lineno, label in raw_labels:
            if problem := name_problem(label):
                raise TSVError(lineno, problem)
        names = sorted({label for _, label in raw_labels})
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for lineno, label in raw_labels:
        if label not in index:
            raise TSVError(lineno, f"label {label[:40]!r} is not one of label_names")
        ids.append(index[label])
    return ids, names


def parse_tsv(
    data: bytes, *, max_bytes: int | None = None, label_names: Sequence[object] | None = None
) -> Examples:
    """Parse and validate a dataset file's bytes (``label_names``: see the module doc)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TSVError(0, f"file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if not data.strip():
        raise TSVError(0, "file is empty")
    names = check_label_names(label_names) if label_names is not None else None
    raw_lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    ncols = _header_columns(raw_lines[0])
    if ncols == 2 and names is not None:
        raise TSVError(0, "label_names were given but the file has no label column")
    texts: list[str] = []
    raw_labels: list[tuple[int, str]] = []
    indices: list[str] = []
    for lineno, raw in enumerate(raw_lines[1:], start=2):
        cols = _split_row(raw, lineno, ncols)
        if cols is None:
            continue
        indices.append(cols[0])
        texts.append(cols[1])
        if ncols == 3:
            raw_labels.append((lineno, cols[2]))
    if not texts:
        raise TSVError(0, "file has a header but no rows")
    if ncols == 2:
        return Examples(texts=texts, labels=[], indices=indices, labelled=False)
    labels, names = _label_ids(raw_labels, names)
    return Examples(
        texts=texts,
        labels=labels,
        indices=indices,
        label_names=names,
        names_in_file=not all(_is_id(x) for _, x in raw_labels),
    )


def read_tsv(path: Path) -> Examples:
    return parse_tsv(Path(path).read_bytes())


def iter_rows(path: Path) -> Iterator[tuple[str, str]]:
    """``(index, sentence)`` of every row of a stored (validated) file, read line by line.

    Memory does not grow with the file; labels, where present, are skipped.
    """
    with Path(path).open("rb") as f:
        ncols = _header_columns(f.readline())
        for lineno, raw in enumerate(f, start=2):
            cols = _split_row(raw.rstrip(b"\n"), lineno, ncols)
            if cols is not None:
                yield cols[0], cols[1]


def clean_text(text: str) -> str:
    """One line of TSV-safe text: tabs and newlines become single spaces."""
    return " ".join(text.replace("\t", " ").split())


def write_tsv(path: Path, texts: list[str], labels: list[int]) -> None:
    """Write rows in the seed's format (tabs and newlines in text become spaces)."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(HEADER) + "\n")
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            f.write(f"{i}\t{clean_text(text)}\t{int(label)}\n")


def canonical_tsv(examples: Examples) -> bytes:
    """A parsed file as stored: labels as class ids (names live with the dataset row)."""
    lines = ["\t".join(HEADER)]
    for index, text, label in zip(examples.indices, examples.texts, examples.labels, strict=True):
        lines.append(f"{index}\t{text}\t{label}")
    return ("\n".join(lines) + "\n").encode("utf-8")
