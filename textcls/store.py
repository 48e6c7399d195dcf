"""The artifact store: dataset files, model folders, job logs, checkpoints, predictions.

Paths are built from integer ids only, never from user-supplied names. The
artifacts live in one of two places (``TEXTCLS_ARTIFACT_URL``), behind one API:

**A folder** (``file://``, the default): everything is under :attr:`root`,
written to a temporary sibling first and renamed into place when complete, so
a crash never leaves a half-written artifact under a real path. Job logs
(``logs/<job id>.log``) are the exception: they are appended to while the job
runs, in whole lines, so they can be read during the run.

**An object store** (``s3://bucket/prefix``, :mod:`textcls.objectstore`): the
artifacts are objects, and :attr:`root` is this host's cache of them. A
committed artifact is uploaded file by file, then its manifest
(``manifests/<path>.json``: every file's size and sha256) is written last:
only then is it complete, and only then does the caller commit its database
row, so a killed upload leaves objects without a manifest and no row (``textcls
check`` reports them, ``gc`` removes them). Reading (:meth:`ArtifactStore.resolve`)
fetches an artifact into the cache once, checks every file against the
manifest's sha256, and later reads use the cached copy after a cheap check
(sizes and modification times, or sha256 again with ``TEXTCLS_CACHE_VERIFY``)
without asking the remote; the cache is kept under ``TEXTCLS_CACHE_MAX_BYTES``
by evicting the least recently used artifacts that no process holds
(:meth:`ArtifactStore.hold`). Artifacts are immutable once registered (ids
are never reused on PostgreSQL), so a cached copy never goes stale. Job logs
are appended locally and uploaded whole every ``TEXTCLS_LOG_UPLOAD_SECONDS``
and when the job ends; checkpoints are uploaded on every save, so a job
resumed on another host finds them.

Top-level folders: ``datasets/``, ``models/``, ``logs/``, ``predictions/``,
``checkpoints/`` (each entry named by a row); local only: ``tmp/`` (staging;
a job's staging folder is named ``job-<id>-…``), ``trash/`` (artifacts moved
aside by a deletion until its transaction ends) and, in a cache, ``.cache/``
(what is cached, and the locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from textcls.objectstore import ObjectStore, s3_store
from textcls.settings import Settings, get_settings

log = logging.getLogger(__name__)

TMP = "tmp"
TRASH = "trash"
# A training job's resumable state, kept while the job runs (see pipeline/checkpoint.py).
CHECKPOINTS = "checkpoints"
LOGS = "logs"
# Object-store keys of the manifests that make artifacts complete.
MANIFESTS = "manifests"
# In a cache: one JSON file per cached artifact (its manifest and file stats), and locks.
CACHE_META = ".cache"
_LOCAL_ONLY = frozenset({TMP, TRASH, CACHE_META})
# Written in place while a job runs, so neither manifested nor cached.
_MUTABLE = frozenset({LOGS, CHECKPOINTS})
# Lists the remote artifacts a deletion moved aside (a file in trash/<uuid>/).
_TRASH_LIST = ".remote.json"
# How far back from the end a tail read looks at a time.
_TAIL_BLOCK = 64 * 1024
_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class LogChunk:
    """Part of a job's log: whole lines, and the byte offset just after them."""

    data: bytes
    end: int
    exists: bool


@dataclass(frozen=True)
class Entry:
    """One artifact as the store holds it: a file or a folder, its bytes and age."""

    folder: str
    name: str
    is_dir: bool
    size: int
    files: int
    mtime: float
    # Object store: its manifest is written (a folder is always complete).
    complete: bool = True

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"

    def age(self) -> float:
        return max(0.0, time.time() - self.mtime)


@dataclass
class Manifest:
    """What a complete artifact holds: each file's size and sha256 ("" names a file artifact)."""

    relpath: str
    is_dir: bool
    files: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())

    def to_json(self) -> bytes:
        files = {rel: {"size": s, "sha256": d} for rel, (s, d) in sorted(self.files.items())}
        body = {"version": 1, "relpath": self.relpath, "is_dir": self.is_dir, "files": files}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        body = json.loads(data)
        files = {rel: (int(f["size"]), str(f["sha256"])) for rel, f in body["files"].items()}
        return cls(str(body["relpath"]), bool(body["is_dir"]), files)


class CorruptArtifact(OSError):
    """A downloaded file does not match its manifest."""


def checkpoint_relpath(job_id: int) -> str:
    """The folder of a job's training checkpoint."""
    return f"{CHECKPOINTS}/{int(job_id)}"


def remote_from_settings(settings: Settings) -> ObjectStore | None:
    """The object store ``TEXTCLS_ARTIFACT_URL`` names, or None for a folder."""
    bucket = settings.artifact_bucket()
    if bucket is None:
        return None
    return s3_store(bucket[0], bucket[1], settings.s3_endpoint_url)


class ArtifactStore:
    """Artifacts by relative path; ``ArtifactStore()`` is the one the settings name."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        remote: ObjectStore | None = None,
        cache_max_bytes: int = 20 * 1024**3,
        verify: str = "stat",
        log_upload_seconds: float = 5.0,
    ) -> None:
        if root is None:
            # The settings' store: its folder, or its object store with this host's cache.
            vars(self).update(vars(ArtifactStore.from_settings(get_settings())))
            return
        self.root = root.resolve()
        self.remote = remote
        # 0: no bound.
        self.cache_max_bytes = cache_max_bytes
        self.verify = verify
        self.log_upload_seconds = log_upload_seconds
        self._log_uploaded: dict[int, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> ArtifactStore:
        settings = settings or get_settings()
        remote = remote_from_settings(settings)
        if remote is None:
            return cls(settings.resolved_artifact_dir())
        return cls(
            settings.resolved_cache_dir(),
            remote=remote,
            cache_max_bytes=settings.cache_max_bytes,
            verify=settings.cache_verify,
            log_upload_seconds=settings.log_upload_seconds,
        )

    @property
    def url(self) -> str:
        return self.remote.url if self.remote is not None else self.root.as_uri()

    # Relative paths are what the database stores, so the folder can move.
    def dataset_relpath(self, dataset_id: int) -> str:
        return f"datasets/{int(dataset_id)}.tsv"

    def model_relpath(self, model_id: int) -> str:
        return f"models/{int(model_id)}"

    def checkpoint_relpath(self, job_id: int) -> str:
        return checkpoint_relpath(job_id)

    def log_relpath(self, job_id: int) -> str:
        return f"{LOGS}/{int(job_id)}.log"

    def predictions_relpath(self, job_id: int) -> str:
        """A ``predict`` job's output TSV (written in staging, renamed into place)."""
        return f"predictions/{int(job_id)}.tsv"

    def local_path(self, relpath: str) -> Path:
        """Where a stored relative path lives here; refuses anything outside the root."""
        path = (self.root / relpath).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"path escapes the artifact folder: {relpath!r}")
        return path

    def _kind(self, path: Path) -> str:
        """The top-level folder of a local path (``models``, ``tmp``…)."""
        parts = path.relative_to(self.root).parts
        return parts[0] if parts else ""

    def _remote_kind(self, path: Path) -> bool:
        """Whether this path stands for objects in the object store."""
        return self.remote is not None and self._kind(path) not in _LOCAL_ONLY | {""}

    def resolve(self, relpath: str) -> Path:
        """The local path of an artifact, fetched into the cache first with an object store.

        Refuses anything outside the root. The path may not exist (no such artifact).
        """
        path = self.local_path(relpath)
        if not self._remote_kind(path) or self._kind(path) in _MUTABLE:
            return path
        return self._fetch(path.relative_to(self.root).as_posix(), path)

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
        """Put a finished file or folder in place: renamed (same filesystem), or
        uploaded with its manifest last and then kept in the cache."""
        dest = self.local_path(relpath)
        if not self._remote_kind(dest):
            _replace(src, dest)
            return dest
        rel = dest.relative_to(self.root).as_posix()
        started = time.monotonic()
        manifest = self._upload(src, rel)
        log.info(
            "uploaded %s (%d bytes) to %s in %.2f s",
            rel,
            manifest.size,
            self.url,
            time.monotonic() - started,
        )
        with self._lock(rel, "fetch"):
            self._drop_cached(rel, dest)
            try:
                _replace(src, dest)
            except OSError as exc:  # complete in the store; only not cached here
                log.info("not caching %s: %s", rel, exc)
                return dest
            self._write_marker(rel, manifest, dest)
        self._evict(keep={rel})
        return dest

    def unplace(self, relpath: str, staged: Path) -> None:
        """Take back an artifact placed for a row that did not commit: to ``staged``."""
        path = self.local_path(relpath)
        if self._remote_kind(path):
            rel = path.relative_to(self.root).as_posix()
            self._delete_remote(rel)
            self._marker(rel).unlink(missing_ok=True)
        os.replace(path, staged)

    def remove(self, relpath: str) -> None:
        path = self.local_path(relpath)
        if self._remote_kind(path):
            rel = path.relative_to(self.root).as_posix()
            self._delete_remote(rel)
            with self._lock(rel, "fetch"):
                self._drop_cached(rel, path)
            return
        _remove_path(path)

    def exists(self, relpath: str) -> bool:
        return self.stat(relpath) is not None

    def stat(self, relpath: str) -> Entry | None:
        """The artifact's kind and size (a complete one's, from its manifest), None if absent."""
        path = self.local_path(relpath)
        rel = path.relative_to(self.root).as_posix()
        folder, _, name = rel.partition("/")
        if not self._remote_kind(path):
            return _local_entry(folder, path) if path.exists() else None
        if folder in _MUTABLE:  # a log or a checkpoint: no manifest
            objs = self._remote_objects(rel)
            if not objs:
                return None
            is_dir = any(o.key != rel for o in objs)
            size, mtime = sum(o.size for o in objs), max(o.mtime for o in objs)
            return Entry(folder, name, is_dir, size, len(objs), mtime)
        manifest = self._remote_manifest(rel)
        if manifest is None:
            return None
        return Entry(folder, name, manifest.is_dir, manifest.size, len(manifest.files), 0.0)

    def scan(self, folder: str) -> dict[str, Entry]:
        """Every entry of one top-level folder (``models``, ``logs``…), by name."""
        if self.remote is None or folder in _LOCAL_ONLY:
            base = self.root / folder
            entries = sorted(base.iterdir()) if base.is_dir() else []
            return {e.name: _local_entry(folder, e) for e in entries}
        return self._scan_remote(folder)

    def hold(self, relpath: str) -> contextlib.AbstractContextManager[None]:
        """While held (by any process on this host), the cache does not evict it."""
        path = self.local_path(relpath)
        if not self._remote_kind(path):
            return contextlib.nullcontext()
        return self._lock(path.relative_to(self.root).as_posix(), "use", shared=True)

    # ------------------------------------------------------------------ job logs

    def append_log(self, job_id: int, text: str) -> None:
        """Append whole lines (``text`` ends with a newline) to the job's log."""
        path = self.local_path(self.log_relpath(job_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(text.encode("utf-8", "replace"))
        if self.remote is not None:
            last = self._log_uploaded.get(job_id)
            if last is None or time.monotonic() - last >= self.log_upload_seconds:
                try:
                    self.flush_log(job_id)
                except Exception as exc:  # written here; the next upload carries it
                    log.warning("could not upload the log of job %s: %s", job_id, exc)

    def open_log(self, job_id: int) -> int:
        """Make the job's log here the latest (from the object store); its size."""
        relpath = self.log_relpath(job_id)
        path = self.local_path(relpath)
        if self.remote is not None:
            info = self.remote.head(relpath)
            if info is not None and info.size > (path.stat().st_size if path.is_file() else 0):
                self.remote.get_file(relpath, path)
        return path.stat().st_size if path.is_file() else 0

    def flush_log(self, job_id: int) -> None:
        """Upload the job's log as it is here now (object store only)."""
        relpath = self.log_relpath(job_id)
        path = self.local_path(relpath)
        if self.remote is None or not path.is_file():
            return
        self._log_uploaded[job_id] = time.monotonic()
        self.remote.put_file(relpath, path)

    def add_log_lines(self, job_id: int, text: str) -> None:
        """Add lines to a log this process is not writing (read, append, write back)."""
        if self.remote is None:
            self.append_log(job_id, text)
            return
        relpath = self.log_relpath(job_id)
        old = self.remote.get_bytes(relpath) or b""
        self.remote.put_bytes(relpath, old + text.encode("utf-8", "replace"))

    def read_log(self, job_id: int, *, offset: int = 0, tail: int | None = None) -> LogChunk:
        """The log's whole lines from byte ``offset`` on, or only the last ``tail`` of them.

        A line still being written (no newline yet) is left for the next read,
        so a follower that reads again from ``end`` never sees half a line.
        With an object store this is the copy uploaded last.
        """
        if self.remote is not None:
            return self._read_remote_log(job_id, offset, tail)
        path = self.local_path(self.log_relpath(job_id))
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return LogChunk(b"", 0, exists=False)
        with f:
            return _read_lines(f, os.fstat(f.fileno()).st_size, offset, tail)

    def _read_remote_log(self, job_id: int, offset: int, tail: int | None) -> LogChunk:
        assert self.remote is not None
        relpath = self.log_relpath(job_id)
        if tail is None and offset > 0:
            data = self.remote.get_bytes(relpath, start=offset)
            if data is None:
                return LogChunk(b"", 0, exists=False)
            if not data:  # at or past the end
                info = self.remote.head(relpath)
                return LogChunk(b"", min(offset, info.size if info else 0), exists=True)
            cut = data.rfind(b"\n") + 1
            return LogChunk(data[:cut], offset + cut, exists=True)
        whole = self.remote.get_bytes(relpath)
        if whole is None:
            return LogChunk(b"", 0, exists=False)
        return _read_lines(io.BytesIO(whole), len(whole), offset, tail)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self, job_id: int) -> Path:
        """The job's checkpoint folder here, with what an earlier attempt uploaded."""
        relpath = checkpoint_relpath(job_id)
        path = self.local_path(relpath)
        if self.remote is not None:
            for obj in self._remote_objects(relpath):
                self.remote.get_file(obj.key, path / obj.key[len(relpath) + 1 :])
        return path

    def save_checkpoint_file(self, job_id: int, file: Path) -> None:
        """Upload one saved checkpoint file (object store only; a failure is logged)."""
        if self.remote is None:
            return
        key = f"{checkpoint_relpath(job_id)}/{file.name}"
        try:
            self.remote.put_file(key, file)
        except Exception as exc:  # the next save tries again; the job goes on
            log.warning("could not upload checkpoint %s: %s", key, exc)

    # ------------------------------------------------------------------ deletion

    def move_aside(self, relpaths: Iterable[str]) -> Path | None:
        """Move artifacts into one new ``trash/<uuid>/`` folder, under their relative paths.

        Missing ones are skipped; None when nothing was moved. :meth:`restore`
        puts them back (the deletion did not commit), :meth:`purge` removes them.
        An object store's objects stay until :meth:`purge` (the folder lists them).
        """
        trash = self.root / TRASH / uuid.uuid4().hex
        moved = False
        remote: list[str] = []
        for relpath in relpaths:
            src = self.local_path(relpath)
            rel = src.relative_to(self.root).as_posix()
            if self._remote_kind(src):
                if self._remote_objects(rel):
                    remote.append(rel)
                self._marker(rel).unlink(missing_ok=True)
            if not src.exists():
                continue
            dest = trash / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            moved = True
        if remote:
            trash.mkdir(parents=True, exist_ok=True)
            (trash / _TRASH_LIST).write_text(json.dumps(sorted(remote)))
        return trash if moved or remote else None

    def trashed(self, trash: Path) -> list[str]:
        """The relative paths held in one trash folder (``models/5``, ``logs/7.log``)."""
        local = {
            f"{folder.name}/{entry.name}"
            for folder in trash.iterdir()
            if folder.is_dir()
            for entry in folder.iterdir()
        }
        return sorted(local | set(_trash_list(trash)))

    def restore(self, trash: Path, relpaths: Iterable[str] | None = None) -> None:
        """Put a trash folder's artifacts (or only ``relpaths``) back where they were.

        Restoring them all drops the trash folder too. With an object store the
        objects never moved; the cached copy is dropped (fetched again when used).
        """
        listed = _trash_list(trash)
        for relpath in self.trashed(trash) if relpaths is None else relpaths:
            if self.remote is not None:
                _remove_path(trash / relpath)
                listed = [r for r in listed if r != relpath]
                continue
            dest = self.local_path(relpath)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(trash / relpath, dest)
        if relpaths is None:
            shutil.rmtree(trash, ignore_errors=True)
        elif self.remote is not None and trash.is_dir():
            (trash / _TRASH_LIST).write_text(json.dumps(listed))

    def purge(self, trash: Path) -> None:
        for relpath in _trash_list(trash):
            try:
                self._delete_remote(relpath)
            except Exception as exc:  # left as an orphan: `textcls gc` removes it
                log.warning("could not delete %s from %s: %s", relpath, self.url, exc)
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self, folder: str) -> list[Path]:
        """The local entries of one top-level folder (``tmp``, ``trash``…), sorted."""
        base = self.root / folder
        return sorted(base.iterdir()) if base.is_dir() else []

    # ------------------------------------------------------------------ object store

    def _remote_objects(self, relpath: str) -> list[Any]:
        """The objects of one artifact: the file itself, or everything in the folder."""
        assert self.remote is not None
        return [
            o
            for o in self.remote.list(relpath)
            if o.key == relpath or o.key.startswith(f"{relpath}/")
        ]

    def _remote_manifest(self, relpath: str) -> Manifest | None:
        assert self.remote is not None
        data = self.remote.get_bytes(_manifest_key(relpath))
        return Manifest.from_json(data) if data is not None else None

    def _delete_remote(self, relpath: str) -> None:
        """The manifest first: an artifact half deleted is an incomplete one."""
        assert self.remote is not None
        self.remote.delete([_manifest_key(relpath)])
        self.remote.delete([o.key for o in self._remote_objects(relpath)])

    def _upload(self, src: Path, relpath: str) -> Manifest:
        """Upload a file or folder as ``relpath``; the manifest goes last."""
        assert self.remote is not None
        # A retried job may have committed before dying: the new copy wins.
        self.remote.delete([_manifest_key(relpath)])
        manifest = Manifest(relpath, src.is_dir())
        for rel, path in _files_of(src):
            manifest.files[rel] = (path.stat().st_size, _sha256(path))
            self.remote.put_file(_object_key(relpath, rel), path)
        keep = {_object_key(relpath, rel) for rel in manifest.files}
        self.remote.delete([o.key for o in self._remote_objects(relpath) if o.key not in keep])
        self.remote.put_bytes(_manifest_key(relpath), manifest.to_json())
        return manifest

    def _scan_remote(self, folder: str) -> dict[str, Entry]:
        assert self.remote is not None
        grouped: dict[str, list[Any]] = {}
        dirs: set[str] = set()
        for obj in self.remote.list(f"{folder}/"):
            name, sep, _ = obj.key[len(folder) + 1 :].partition("/")
            grouped.setdefault(name, []).append(obj)
            if sep:
                dirs.add(name)
        prefix = f"{MANIFESTS}/{folder}/"
        manifests = {
            o.key[len(prefix) : -len(".json")]: o
            for o in self.remote.list(prefix)
            if o.key.endswith(".json")
        }
        out = {
            name: Entry(
                folder,
                name,
                name in dirs,
                sum(o.size for o in objs),
                len(objs),
                max(o.mtime for o in objs),
                complete=folder in _MUTABLE or name in manifests,
            )
            for name, objs in grouped.items()
        }
        for name, obj in manifests.items():
            if name not in out and "/" not in name:  # a complete artifact of no files
                manifest = self._remote_manifest(f"{folder}/{name}")
                is_dir = manifest.is_dir if manifest is not None else True
                out[name] = Entry(folder, name, is_dir, 0, 0, obj.mtime)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ cache

    def _marker(self, relpath: str) -> Path:
        return self.root / CACHE_META / "entries" / f"{relpath}.json"

    @contextlib.contextmanager
    def _lock(
        self, relpath: str, kind: str, *, shared: bool = False, wait: bool = True
    ) -> Iterator[None]:
        """An advisory lock on one cached artifact, across this host's processes."""
        path = self.root / CACHE_META / "locks" / f"{relpath}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(f, mode if wait else mode | fcntl.LOCK_NB)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _fetch(self, relpath: str, path: Path) -> Path:
        """The cached copy of an artifact, downloaded and verified first if need be."""
        with self._lock(relpath, "fetch"):
            if self._intact(relpath, path):
                os.utime(self._marker(relpath))  # most recently used
                return path
            manifest = self._remote_manifest(relpath)
            self._drop_cached(relpath, path)
            if manifest is None:
                return path  # not (or not completely) in the store
            started = time.monotonic()
            self._download(relpath, manifest, path)
            log.info(
                "fetched %s (%d bytes) from %s in %.2f s",
                relpath,
                manifest.size,
                self.url,
                time.monotonic() - started,
            )
        self._evict(keep={relpath})
        return path

    def _download(self, relpath: str, manifest: Manifest, path: Path) -> None:
        assert self.remote is not None
        staging = self.tmp_dir("fetch")
        try:
            target = staging / "artifact"
            if manifest.is_dir:
                target.mkdir()
            for rel, (size, digest) in manifest.files.items():
                dest = target / rel if rel else target
                got = self.remote.get_file(_object_key(relpath, rel), dest)
                if dest.stat().st_size != size or got != digest:
                    raise CorruptArtifact(
                        f"{self.url}/{_object_key(relpath, rel)} does not match its manifest "
                        f"({dest.stat().st_size} bytes, the manifest says {size})"
                    )
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, path)
            self._write_marker(relpath, manifest, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_marker(self, relpath: str, manifest: Manifest, path: Path) -> None:
        stats = {}
        for rel in manifest.files:
            st = (path / rel if rel else path).stat()
            stats[rel] = [st.st_size, st.st_mtime_ns]
        marker = self._marker(relpath)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
        body = {"manifest": json.loads(manifest.to_json()), "stats": stats}
        tmp.write_text(json.dumps(body))
        os.replace(tmp, marker)

    def _intact(self, relpath: str, path: Path) -> bool:
        """Whether the cached copy is complete and unchanged since it was verified."""
        try:
            body = json.loads(self._marker(relpath).read_text())
            manifest = Manifest.from_json(json.dumps(body["manifest"]))
            if manifest.is_dir:
                present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
                if present != set(manifest.files):
                    return False
            for rel, (size, digest) in manifest.files.items():
                file = path / rel if rel else path
                st = file.stat()
                if self.verify == "sha256":
                    if st.st_size != size or _sha256(file) != digest:
                        return False
                elif [st.st_size, st.st_mtime_ns] != body["stats"][rel] or st.st_size != size:
                    return False
        except (OSError, ValueError, KeyError):
            return False
        return True

    def _drop_cached(self, relpath: str, path: Path) -> None:
        self._marker(relpath).unlink(missing_ok=True)
        _remove_path(path)

    def cached(self) -> list[tuple[str, int, float]]:
        """What the cache holds: (relative path, bytes, last use), least recently used first."""
        base = self.root / CACHE_META / "entries"
        found = []
        for marker in base.rglob("*.json") if base.is_dir() else []:
            if marker.name.startswith("."):
                continue
            try:
                size = Manifest.from_json(json.dumps(json.loads(marker.read_text())["manifest"]))
                used = marker.stat().st_mtime
            except (OSError, ValueError, KeyError):
                continue
            rel = marker.relative_to(base).as_posix()[: -len(".json")]
            found.append((rel, size.size, used))
        return sorted(found, key=lambda item: item[2])

    def _evict(self, keep: set[str]) -> None:
        """Remove least recently used artifacts until the cache is under its bound."""
        if self.cache_max_bytes <= 0:
            return
        entries = self.cached()
        total = sum(size for _, size, _ in entries)
        for relpath, size, _ in entries:
            if total <= self.cache_max_bytes:
                break
            if relpath in keep:
                continue
            try:
                with (
                    self._lock(relpath, "fetch", wait=False),
                    self._lock(relpath, "use", wait=False),
                ):
                    self._drop_cached(relpath, self.local_path(relpath))
            except BlockingIOError:
                continue  # in use on this host
            total -= size
            log.info("evicted %s (%d bytes) from the cache", relpath, size)


def _manifest_key(relpath: str) -> str:
    return f"{MANIFESTS}/{relpath}.json"


def _object_key(relpath: str, rel: str) -> str:
    return f"{relpath}/{rel}" if rel else relpath


def _files_of(src: Path) -> list[tuple[str, Path]]:
    """(path within the artifact, file) for each file; a file artifact's own is ""."""
    if not src.is_dir():
        return [("", src)]
    return sorted((p.relative_to(src).as_posix(), p) for p in src.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _trash_list(trash: Path) -> list[str]:
    try:
        return list(json.loads((trash / _TRASH_LIST).read_text()))
    except FileNotFoundError:
        return []


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` atomically (same filesystem), replacing what is there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        # A retried job may have committed before dying; the new copy wins.
        trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        os.replace(dest, trash)
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
    os.replace(src, dest)


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _local_entry(folder: str, path: Path) -> Entry:
    is_dir = path.is_dir()
    files = [p for p in path.rglob("*") if p.is_file()] if is_dir else [path]
    size = sum(p.stat().st_size for p in files)
    return Entry(folder, path.name, is_dir, size, len(files), path.stat().st_mtime)


def _read_lines(f: BinaryIO, size: int, offset: int, tail: int | None) -> LogChunk:
    """Whole lines of an open log from ``offset`` (or its last ``tail`` lines)."""
    start = min(max(0, offset), size)
    if tail is not None:
        start = max(start, _tail_start(f, size, tail))
    f.seek(start)
    data = f.read(size - start)
    cut = data.rfind(b"\n") + 1
    return LogChunk(data[:cut], start + cut, exists=True)


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
