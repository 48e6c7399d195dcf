"""The artifact store on a real S3 server (moto's, its own process) with a cache per host.

Each "host" is an ArtifactStore built from Settings as a service builds it
(TEXTCLS_ARTIFACT_URL=s3://…, TEXTCLS_S3_ENDPOINT_URL, the AWS_* variables)
with its own data folder: nothing is shared between them but the bucket. What
reached the server is read from the server's own request log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session, select

from launch.procs import wait_for
from tests.objectstore import MotoServer
from textcls.consistency import check_consistency
from textcls.db import engine_for, migrate
from textcls.models import Model
from textcls.records import add_dataset, add_model
from textcls.retention import collect_garbage
from textcls.settings import Settings
from textcls.store import ArtifactStore, checkpoint_relpath

REPO = Path(__file__).resolve().parents[2]


def _host(tmp_path: Path, s3: dict[str, str], name: str, **settings: object) -> ArtifactStore:
    return ArtifactStore.from_settings(
        Settings(data_dir=tmp_path / name, **s3, **settings)  # type: ignore[arg-type]
    )


def _model_folder(path: Path, files: int = 3, size: int = 1000, seed: int = 0) -> Path:
    (path / "sub").mkdir(parents=True)
    for i in range(files):
        where = path / "sub" if i == 0 else path
        (where / f"w{i}.bin").write_bytes(os.urandom(size) if seed else bytes([i + seed]) * size)
    return path


def _requests(moto: MotoServer, fragment: str, method: str = "") -> list[tuple[str, str, int]]:
    return [r for r in moto.requests() if fragment in r[1] and method in r[0]]


def _bucket(s3: dict[str, str]) -> str:
    return s3["artifact_url"].split("/")[2]


def _db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'textcls.db'}"
    migrate(url)
    return url


def test_round_trip_across_hosts(
    tmp_path: Path, s3_settings: dict[str, str], moto_server: MotoServer
) -> None:
    a, b = _host(tmp_path, s3_settings, "a"), _host(tmp_path, s3_settings, "b")
    assert a.root == (tmp_path / "a" / "cache").resolve() and a.url == s3_settings["artifact_url"]
    url = _db(tmp_path)
    with Session(engine_for(url)) as session:
        ds = add_dataset(
            session, a, b"i\tt\tl\n0\tx\t1\n", name="d", rows=1, num_labels=2, label_counts={}
        )
        model = add_model(
            session, a, _model_folder(tmp_path / "m"), name="m", format="pytorch", num_labels=2
        )
        session.commit()
        ds_path, model_path, model_size = ds.path, model.path, model.size_bytes
    # Host a keeps what it committed in its cache; host b fetches it, verified.
    assert (a.root / "models" / "1" / "sub" / "w0.bin").is_file()
    assert not (b.root / "models").exists()
    folder = b.resolve(model_path)
    assert sorted(p.name for p in folder.rglob("*.bin")) == ["w0.bin", "w1.bin", "w2.bin"]
    assert (folder / "w2.bin").read_bytes() == bytes([2]) * 1000
    assert b.resolve(ds_path).read_bytes() == b"i\tt\tl\n0\tx\t1\n"
    entry = b.stat(model_path)
    assert entry is not None and entry.is_dir and entry.size == 3000 == model_size
    assert set(b.scan("models")) == {"1"} and b.scan("models")["1"].complete
    with Session(engine_for(url)) as session:
        assert check_consistency(session, b) == []

    # The second read on a host asks the server nothing at all.
    before = len(moto_server.requests())
    assert b.resolve(model_path) == folder and b.resolve(ds_path).is_file()
    assert len(moto_server.requests()) == before

    b.remove(model_path)
    assert a.stat(model_path) is None and not folder.exists()
    assert moto_server.client().list_objects_v2(Bucket=_bucket(s3_settings))["KeyCount"] == 2


CHILD = """
import sys
from pathlib import Path
from sqlmodel import Session
from textcls.db import engine_for
from textcls.records import add_model
from textcls.settings import Settings
from textcls.store import ArtifactStore
url, endpoint, data_dir, db, folder = sys.argv[1:]
settings = Settings(artifact_url=url, s3_endpoint_url=endpoint, data_dir=data_dir)
store = ArtifactStore.from_settings(settings)
with Session(engine_for(db)) as session:
    add_model(session, store, Path(folder), name="big", format="pytorch", num_labels=2)
    session.commit()
print("committed", flush=True)
"""


def test_a_killed_upload_registers_nothing_and_gc_removes_it(
    tmp_path: Path, s3_settings: dict[str, str], moto_server: MotoServer
) -> None:
    url = _db(tmp_path)
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(150):
        (folder / f"part{i:03d}.bin").write_bytes(os.urandom(256 * 1024))
    bucket = _bucket(s3_settings)
    argv = [s3_settings["artifact_url"], s3_settings["s3_endpoint_url"], str(tmp_path / "up")]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv, url, str(folder)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # Killed as soon as its first file is in: mid-way through the folder.
        wait_for(
            lambda: _requests(moto_server, f"/{bucket}/artifacts/models/1/p", "PUT"), 60, "PUT"
        )
        child.send_signal(signal.SIGKILL)
    finally:
        out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, out
    assert not _requests(moto_server, f"/{bucket}/artifacts/manifests/"), "manifest written"

    store = _host(tmp_path, s3_settings, "checker")
    entry = store.scan("models")["1"]
    assert not entry.complete and 0 < entry.files < 150
    assert store.stat("models/1") is None  # not an artifact: nothing reads it
    assert not store.resolve("models/1").exists()
    with Session(engine_for(url)) as session:
        assert list(session.exec(select(Model))) == []
        problems = check_consistency(session, store)
        assert len(problems) == 1 and problems[0].startswith("orphan folder 'models/1'"), problems
        assert "no manifest" in problems[0]
        report = collect_garbage(session, store, min_age_seconds=0)
        assert report.orphans == ["models/1"]
        assert check_consistency(session, store) == []
    assert store.scan("models") == {}


def test_the_cache_refetches_a_changed_copy(
    tmp_path: Path, s3_settings: dict[str, str], moto_server: MotoServer
) -> None:
    a = _host(tmp_path, s3_settings, "a")
    with a.staging() as tmp:
        a.commit(_model_folder(tmp / "m", seed=1), "models/7")
    b = _host(tmp_path, s3_settings, "b")
    good = (b.resolve("models/7") / "w1.bin").read_bytes()
    gets = len(_requests(moto_server, "models/7/w1.bin", "GET"))

    # Changed in place (same size, new mtime): fetched again, the right bytes.
    (b.root / "models" / "7" / "w1.bin").write_bytes(b"\0" * 1000)
    assert (b.resolve("models/7") / "w1.bin").read_bytes() == good
    assert len(_requests(moto_server, "models/7/w1.bin", "GET")) == gets + 1
    # A file added or removed in the copy makes it stale too.
    (b.root / "models" / "7" / "w2.bin").unlink()
    assert (b.resolve("models/7") / "w2.bin").is_file()

    # Bytes changed behind the stat check (mtime put back): sha256 mode sees it.
    c = _host(tmp_path, s3_settings, "c", cache_verify="sha256")
    path = c.resolve("models/7") / "w1.bin"
    st = path.stat()
    path.write_bytes(b"\1" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (c.resolve("models/7") / "w1.bin").read_bytes() == good


def test_the_cache_stays_under_its_bound_and_keeps_what_is_held(
    tmp_path: Path, s3_settings: dict[str, str]
) -> None:
    a = _host(tmp_path, s3_settings, "a", cache_max_bytes=0)
    for i in (1, 2, 3):
        with a.staging() as tmp:
            a.commit(_model_folder(tmp / "m"), f"models/{i}")
    b = _host(tmp_path, s3_settings, "b", cache_max_bytes=7000)  # two 3000-byte models
    for i in (1, 2):
        b.resolve(f"models/{i}")
        time.sleep(0.02)  # distinct last-use times
    b.resolve("models/3")
    assert [rel for rel, _, _ in b.cached()] == ["models/2", "models/3"]
    assert not (b.root / "models" / "1").exists()

    # models/2 is the least recently used, but held (a job reads it): models/3 goes.
    with b.hold("models/2"):
        b.resolve("models/1")
        assert sorted(rel for rel, _, _ in b.cached()) == ["models/1", "models/2"]
    assert sum(size for _, size, _ in b.cached()) <= 7000


def test_logs_checkpoints_and_deletion(
    tmp_path: Path, s3_settings: dict[str, str], moto_server: MotoServer
) -> None:
    worker = _host(tmp_path, s3_settings, "worker", log_upload_seconds=3600)
    api = _host(tmp_path, s3_settings, "api")
    assert api.read_log(4).exists is False
    worker.append_log(4, "one\n")  # the first lines go up at once
    worker.append_log(4, "two\n")
    chunk = api.read_log(4)
    assert chunk.data == b"one\n" and chunk.end == 4
    worker.flush_log(4)  # as at the job's end
    assert api.read_log(4, offset=chunk.end).data == b"two\n"
    assert api.read_log(4, tail=1).data == b"two\n"
    assert api.read_log(4, offset=99).data == b"" and api.read_log(4, offset=99).end == 8
    # A retry on another host continues the log; an event from elsewhere is added.
    other = _host(tmp_path, s3_settings, "other")
    assert other.open_log(4) == 8
    api.add_log_lines(4, "an event\n")
    assert api.read_log(4).data == b"one\ntwo\nan event\n"

    ckpt = worker.checkpoint_dir(4)
    assert not ckpt.exists()
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"state")
    worker.save_checkpoint_file(4, ckpt / "checkpoint.pt")
    assert (other.checkpoint_dir(4) / "checkpoint.pt").read_bytes() == b"state"
    assert set(api.scan("checkpoints")) == {"4"}
    log_entry, ckpt_entry = api.stat("logs/4.log"), api.stat(checkpoint_relpath(4))
    assert log_entry is not None and not log_entry.is_dir and log_entry.size == 17
    assert ckpt_entry is not None and ckpt_entry.is_dir and ckpt_entry.size == 5

    with worker.staging() as tmp:
        (tmp / "d.tsv").write_bytes(b"data")
        worker.commit(tmp / "d.tsv", "datasets/3.tsv")
    paths = ["datasets/3.tsv", "logs/4.log", checkpoint_relpath(4), "models/99"]
    trash = api.move_aside(paths)
    assert trash is not None
    assert api.trashed(trash) == ["checkpoints/4", "datasets/3.tsv", "logs/4.log"]
    api.restore(trash)  # the deletion did not commit: nothing changed remotely
    assert api.resolve("datasets/3.tsv").read_bytes() == b"data"
    trash = api.move_aside(paths)
    assert trash is not None
    api.purge(trash)
    assert not trash.exists()
    for folder in ("datasets", "logs", "checkpoints", "manifests/datasets"):
        assert api.scan(folder) == {}, folder
    assert worker.stat("datasets/3.tsv") is None


def test_artifact_url_settings(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, artifact_url=f"file://{tmp_path}/elsewhere")
    assert s.resolved_artifact_dir() == (tmp_path / "elsewhere").resolve()
    assert s.artifact_bucket() is None
    assert ArtifactStore.from_settings(s).remote is None
    s3 = Settings(data_dir=tmp_path, artifact_url="s3://my-bucket/some/prefix/")
    assert s3.artifact_bucket() == ("my-bucket", "some/prefix")
    assert s3.resolved_cache_dir() == (tmp_path / "cache").resolve()
    assert Settings(data_dir=tmp_path).resolved_artifact_dir() == (tmp_path / "artifacts").resolve()
    for bad in ("s3://", "s3://UPPER/x", "http://host/x", "file://relative/x", "s3://b?x=1"):
        with pytest.raises(ValidationError, match="TEXTCLS_ARTIFACT_URL"):
            Settings(artifact_url=bad)
