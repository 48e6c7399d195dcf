"""The artifact store: one folder holding dataset files, model folders and job logs.

Paths are built from integer ids only, never from user-supplied names, and
everything is written to a temporary sibling first and renamed into place when
complete, so a crash never leaves a half-written artifact under a real path.
Job logs (``logs/<job id>.log``) are the exception: they are appended to while
the job runs, in whole lines, so they can be read during the run.

Top-level folders: ``datasets/``, ``models/``, ``logs/`` (each entry named by a
row), ``tmp/`` (staging; a job's staging folder is named ``job-<id>-…``) and
``trash/`` (artifacts moved aside by a deletion until its transaction ends).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textcls.settings import get_settings

TMP = "tmp"
TRASH = "trash"
# How far back from the end a tail read looks at a time.
_TAIL_BLOCK = 64 * 1024


@dataclass(frozen=True)
class LogChunk:
    """Part of a job's log: whole lines, and the byte offset just after them."""

    data: bytes
    end: int
    exists: bool


# A training job's resumable state, kept while the job runs (see pipeline/checkpoint.py).
CHECKPOINTS = "checkpoints"


def checkpoint_relpath(job_id: int) -> str:
    """The folder of a job's training checkpoint."""
    return f"{CHECKPOINTS}/{int(job_id)}"


class ArtifactStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or get_settings().resolved_artifact_dir()).resolve()

    # Relative paths are what the database stores, so the folder can move.
    def dataset_relpath(self, dataset_id: int) -> str:
        return f"datasets/{int(dataset_id)}.tsv"

    def model_relpath(self, model_id: int) -> str:
        return f"models/{int(model_id)}"

    def checkpoint_relpath(self, job_id: int) -> str:
        return checkpoint_relpath(job_id)

    def log_relpath(self, job_id: int) -> str:
        return f"logs/{int(job_id)}.log"

    def predictions_relpath(self, job_id: int) -> str:
        """A ``predict`` job's output TSV (written in staging, renamed into place)."""
        return f"predictions/{int(job_id)}.tsv"

    def resolve(self, relpath: str) -> Path:
        """Absolute path of a stored relative path; refuses anything outside the root."""
        path = (self.root / relpath).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"path escapes the artifact folder: {relpath!r}")
        return path

    def tmp_dir(self, owner: str | None = None) -> Path:
        """A fresh staging folder; ``owner`` (``job-<id>``) prefixes its name."""
        name = uuid.uuid4().hex if owner is None else f"{owner}-{uuid.uuid4().hex}"
        path = self.root / TMP / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder removed afterwards unless its content was committed."""
        path = self.tmp_dir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, src: Path, relpath: str) -> Path:
        """Move a finished file or folder into place atomically (same filesystem)."""
        dest = self.resolve(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            # A retried job may have committed before dying; the new copy wins.
            trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
        os.replace(src, dest)
        return dest

    def remove(self, relpath: str) -> None:
        path = self.resolve(relpath)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    # ------------------------------------------------------------------ job logs

    def append_log(self, job_id: int, text: str) -> None:
        """Append whole lines (``text`` ends with a newline) to the job's log."""
        path = self.resolve(self.log_relpath(job_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(text.encode("utf-8", "replace"))

    def log_size(self, job_id: int) -> int:
        path = self.resolve(self.log_relpath(job_id))
        return path.stat().st_size if path.is_file() else 0

    def read_log(self, job_id: int, *, offset: int = 0, tail: int | None = None) -> LogChunk:
        """The log's whole lines from byte ``offset`` on, or only the last ``tail`` of them.

        A line still being written (no newline yet) is left for the next read,
        so a follower that reads again from ``end`` never sees half a line.
        """
        path = self.resolve(self.log_relpath(job_id))
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return LogChunk(b"", 0, exists=False)
        with f:
            size = os.fstat(f.fileno()).st_size
            start = min(max(0, offset), size)
            if tail is not None:
                start = max(start, _tail_start(f, size, tail))
            f.seek(start)
            data = f.read(size - start)
        cut = data.rfind(b"\n") + 1
        return LogChunk(data[:cut], start + cut, exists=True)

    # ------------------------------------------------------------------ deletion

    def move_aside(self, relpaths: Iterable[str]) -> Path | None:
        """Move artifacts into one new ``trash/<uuid>/`` folder, under their relative paths.

        Missing ones are skipped; None when nothing was moved. :meth:`restore`
        puts them back (the deletion did not commit), :meth:`purge` removes them.
        """
        trash = self.root / TRASH / uuid.uuid4().hex
        moved = False
        for relpath in relpaths:
            src = self.resolve(relpath)
            if not src.exists():
                continue
            dest = trash / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            moved = True
        return trash if moved else None

    def trashed(self, trash: Path) -> list[str]:
        """The relative paths held in one trash folder (``models/5``, ``logs/7.log``)."""
        return sorted(
            f"{folder.name}/{entry.name}"
            for folder in trash.iterdir()
            if folder.is_dir()
            for entry in folder.iterdir()
        )

    def restore(self, trash: Path, relpaths: Iterable[str] | None = None) -> None:
        """Put a trash folder's artifacts (or only ``relpaths``) back where they were.

        Restoring them all drops the trash folder too.
        """
        for relpath in self.trashed(trash) if relpaths is None else relpaths:
            dest = self.resolve(relpath)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(trash / relpath, dest)
        if relpaths is None:
            shutil.rmtree(trash, ignore_errors=True)

    def purge(self, trash: Path) -> None:
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self, folder: str) -> list[Path]:
        """The entries of one top-level folder (``tmp``, ``trash``, ``models``…), sorted."""
        base = self.root / folder
        return sorted(base.iterdir()) if base.is_dir() else []


def _tail_start(f: Any, size: int, lines: int) -> int:
    """Byte offset of the start of the last ``lines`` whole lines of an open file."""
    if lines <= 0:
        return size
    # The newline before the last ``lines`` whole lines is the (lines + 1)-th
    # from the end (a line still being written has none of its own).
    end = pos = size
    needed = lines + 1
    while pos > 0:
        pos = max(0, pos - _TAIL_BLOCK)
        f.seek(pos)
        block = f.read(end - pos)
        count = block.count(b"\n")
        if count >= needed:
            idx = len(block)
            for _ in range(needed):
                idx = block.rfind(b"\n", 0, idx)
            return pos + idx + 1
        needed -= count
        end = pos
    return 0


def dir_size(path: Path) -> int:
    """Bytes on disk of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
