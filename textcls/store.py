"""The artifact store: one folder holding dataset files and model folders.

Paths are built from integer ids only, never from user-supplied names, and
everything is written to a temporary sibling first and renamed into place when
complete, so a crash never leaves a half-written artifact under a real path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from textcls.settings import get_settings


class ArtifactStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or get_settings().resolved_artifact_dir()).resolve()

    # Relative paths are what the database stores, so the folder can move.
    def dataset_relpath(self, dataset_id: int) -> str:
        return f"datasets/{int(dataset_id)}.tsv"

    def model_relpath(self, model_id: int) -> str:
        return f"models/{int(model_id)}"

    def resolve(self, relpath: str) -> Path:
        """Absolute path of a stored relative path; refuses anything outside the root."""
        path = (self.root / relpath).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"path escapes the artifact folder: {relpath!r}")
        return path

    def tmp_dir(self) -> Path:
        path = self.root / "tmp" / uuid.uuid4().hex
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


def dir_size(path: Path) -> int:
    """Bytes on disk of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
