"""``textcls gc`` and ``textcls check`` on what crashes leave, and ``gc --older-than``,
on a real stack's database (SQLite and PostgreSQL) and artifact folder."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, col, delete

from tests.deploy.helpers import fake_model_folder, register_model
from tests.reliability.helpers import TINY_TSV, consistency_problems
from tests.stack import REPO, Stack
from textcls.db import engine_for
from textcls.models import Model, utcnow
from textcls.retention import collect_garbage
from textcls.store import ArtifactStore

TEXTCLS = str(REPO / ".venv" / "bin" / "textcls")
HOUR = 3600.0


@pytest.fixture
def stack(make_stack: Callable[..., Stack], backend: str) -> Stack:
    s = make_stack(backend)
    s.start_api()
    return s


def _store(stack: Stack) -> ArtifactStore:
    return ArtifactStore(stack.root / "artifacts")


def _model(stack: Stack, name: str, parent_id: int | None = None) -> int:
    folder = fake_model_folder(stack.root / "src" / name)
    return register_model(stack, folder, name=name, parent_id=parent_id)


def _gc(stack: Stack, **kwargs: object) -> dict[str, object]:
    with Session(engine_for(stack.database_url)) as session:
        return collect_garbage(session, _store(stack), **kwargs).model_dump()


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def _cli(stack: Stack, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTCLS_")}
    env.update(stack.env)
    out = subprocess.run(
        [TEXTCLS, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return out.returncode, out.stdout + out.stderr


def test_gc_resolves_interrupted_deletions_and_stale_staging(stack: Stack) -> None:
    store = _store(stack)
    kept, deleted = _model(stack, "kept"), _model(stack, "deleted")
    # A deletion that crashed before its commit: the folder is aside, the row still there.
    before = store.move_aside([f"models/{kept}"])
    # One that crashed after its commit: the row is gone, the folder still aside.
    after = store.move_aside([f"models/{deleted}"])
    with Session(engine_for(stack.database_url)) as session:
        session.exec(delete(Model).where(col(Model.id) == deleted))
        session.commit()
    assert before is not None and after is not None
    # A killed worker's staging folders, and a queued job's own (work in progress).
    stale = store.tmp_dir()
    job = stack.submit("evaluate", model_id=kept, dataset_id=_dataset(stack))
    owned = store.tmp_dir(owner=f"job-{job['id']}")
    fresh = store.tmp_dir()
    for path in (stale, owned, before, after):
        _age(path, 2 * HOUR)

    problems = "\n".join(consistency_problems(stack))
    assert f"model {kept}: folder 'models/{kept}' is missing" in problems
    assert f"'trash/{before.name}/models/{kept}' was moved aside; its row still exists" in problems
    assert f"'trash/{after.name}/models/{deleted}' was moved aside; no row names it" in problems
    assert f"stale staging folder 'tmp/{stale.name}'" in problems
    assert owned.name not in problems and fresh.name not in problems
    code, out = _cli(stack, "check")
    assert code == 1 and f"tmp/{stale.name}" in out, out

    dry = _gc(stack, dry_run=True)
    assert dry["restored"] == [f"trash/{before.name}/models/{kept}"]
    assert dry["trash"] == [f"trash/{after.name}/models/{deleted}"]
    assert dry["staging"] == [f"tmp/{stale.name}"]
    assert stale.exists() and before.exists() and after.exists()  # a dry run changes nothing
    code, out = _cli(stack, "gc", "--dry-run")
    assert code == 0 and f"1 would be removed (stale staging entries): tmp/{stale.name}" in out

    code, out = _cli(stack, "gc")
    assert code == 0 and f"1 removed (stale staging entries): tmp/{stale.name}" in out, out
    assert (store.root / "models" / str(kept)).is_dir()
    assert not stale.exists() and not before.exists() and not after.exists()
    assert owned.exists() and fresh.exists()
    stack.http.post(f"/jobs/{job['id']}/cancel")
    owned.rmdir()
    assert consistency_problems(stack) == []


def _dataset(stack: Stack) -> int:
    path = stack.root / "tiny.tsv"
    path.write_text(TINY_TSV, encoding="utf-8")
    return int(stack.upload(path)["id"])


def test_gc_older_than_keeps_served_history_ancestors_and_young(stack: Stack) -> None:
    lineage = _model(stack, "lineage-root")
    served = _model(stack, "served", lineage)
    history = _model(stack, "history")
    old_root = _model(stack, "old-root")
    old_leaf = _model(stack, "old-leaf", old_root)
    parent_of_young = _model(stack, "parent-of-young")
    young = _model(stack, "young", parent_of_young)
    for m in (history, served):
        assert stack.http.post(f"/models/{m}/promote").status_code == 201
    old = [lineage, served, history, old_root, old_leaf, parent_of_young]
    with Session(engine_for(stack.database_url)) as session:
        stmt = update(Model).where(col(Model.id).in_(old))
        session.exec(stmt.values(created_at=utcnow() - timedelta(days=40)))
        session.commit()

    assert _gc(stack, older_than_days=60)["expired"]["models"] == []
    dry = _gc(stack, older_than_days=30, dry_run=True)
    assert dry["expired"]["models"] == [old_leaf, old_root]
    assert stack.http.get(f"/models/{old_leaf}").status_code == 200
    code, out = _cli(stack, "gc", "--older-than", "30")
    assert code == 0 and f"2 deleted (old models): model {old_leaf}, model {old_root}" in out, out
    remaining = {m["id"] for m in stack.http.get("/models").json()}
    assert remaining == {lineage, served, history, parent_of_young, young}
    assert _cli(stack, "gc", "--older-than", "-1")[0] == 2  # bad input: a usage error
    assert consistency_problems(stack) == []
