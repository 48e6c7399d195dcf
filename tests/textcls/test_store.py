"""The artifact store's job logs and deletion trash, and the runner's log capture, in process."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from textcls.joblog import JobLog, note
from textcls.store import ArtifactStore


def test_log_reads_whole_lines_by_offset_and_tail(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.read_log(3).exists is False and store.read_log(3).data == b""
    store.append_log(3, "".join(f"第{i}行\n" for i in range(5)))
    store.append_log(3, "half a li")  # still being written
    full = store.read_log(3)
    assert full.data.decode().splitlines() == [f"第{i}行" for i in range(5)]
    assert full.end == len(full.data)
    assert store.read_log(3, tail=2).data.decode() == "第3行\n第4行\n"
    assert store.read_log(3, tail=99).data == full.data
    assert store.read_log(3, offset=full.end).data == b""
    store.append_log(3, "ne\n")
    assert store.read_log(3, offset=full.end).data == b"half a line\n"
    assert store.read_log(3, offset=full.end, tail=1).data == b"half a line\n"


def test_move_aside_restore_and_purge(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    (tmp_path / "models" / "1").mkdir(parents=True)
    (tmp_path / "models" / "1" / "w.bin").write_bytes(b"x")
    store.append_log(1, "a\n")
    trash = store.move_aside(["models/1", "logs/1.log", "datasets/9.tsv"])
    assert trash is not None and store.trashed(trash) == ["logs/1.log", "models/1"]
    assert not (tmp_path / "models" / "1").exists()
    store.restore(trash)
    assert (tmp_path / "models" / "1" / "w.bin").read_bytes() == b"x"
    assert not trash.exists()
    assert store.move_aside(["datasets/9.tsv"]) is None
    trash = store.move_aside(["logs/1.log"])
    assert trash is not None
    store.purge(trash)
    assert not trash.exists() and store.read_log(1).exists is False


def test_job_log_keeps_its_threads_records_and_stops_at_its_limit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    step = logging.getLogger("pipeline.some_step")
    step.setLevel(logging.INFO)
    with JobLog(store, 5, max_bytes=2048, flush_interval=0.05) as handler:
        step.info("epoch %d done", 1)
        other = threading.Thread(target=lambda: step.warning("another job's record"))
        other.start()
        other.join()
        note(store, 5, "already captured here")  # not written twice
        note(store, 6, "an event of another job")
        assert handler.active_here(5) and not handler.active_here(6)
    text = store.read_log(5).data.decode()
    assert "INFO pipeline.some_step: epoch 1 done" in text
    assert "another job's record" not in text
    assert text.count("already captured here") == 1
    assert "job 6: an event of another job" in store.read_log(6).data.decode()

    with JobLog(store, 7, max_bytes=1024, flush_interval=0.05):
        for i in range(100):
            step.info("line %d %s", i, "x" * 40)
    text = store.read_log(7).data.decode()
    assert len(text.encode()) < 1024 + 200
    assert text.endswith("log truncated at 1024 bytes (TEXTCLS_JOB_LOG_MAX_BYTES)\n")
    assert "line 0 " in text and "line 99 " not in text
    step.setLevel(logging.NOTSET)
