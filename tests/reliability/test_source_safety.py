"""Static guarantees: no pickle-based loading, no remote code, secrets only from the env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from textcls.settings import Settings
from textcls.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "workers", "pipeline", "deploy", "textcls", "scripts")
# ``trust_remote_code`` set (keyword or dict key) to anything but False.
REMOTE_CODE = r"trust_remote_code[\"']?\s*[:=]\s*+(?!False\b)"


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    assert len(files) > 20
    return files


def _calls(text: str, name: str) -> list[str]:
    """The text of every call ``name(...)`` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 0, m.end() - 1
        for j in range(i, len(text)):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[m.start() : j + 1])
                break
    return out


def test_models_load_without_pickle_or_remote_code() -> None:
    problems = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        for call in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                problems.append(f"{rel}: torch.load without weights_only=True: {call[:80]}")
        if re.search(REMOTE_CODE, text):
            problems.append(f"{rel}: trust_remote_code set to something other than False")
        if re.search(r"weights_only\s*=\s*False", text):
            problems.append(f"{rel}: weights_only=False")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            problems.append(f"{rel}: imports a pickle-based serialiser")
        if re.search(r"\bpickle\.loads?\(|\byaml\.load\((?![^)]*SafeLoader)", text):
            problems.append(f"{rel}: unsafe deserialisation")
        if re.search(r"accept_content\s*=\s*\[[^\]]*pickle", text):
            problems.append(f"{rel}: Celery accepts pickle")
    assert problems == []


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = "m = torch.load(f, map_location='cpu')\nok = torch.load(f, weights_only=True)"
    calls = _calls(bad, "torch.load")
    assert [bool(re.search(r"weights_only\s*=\s*True", c)) for c in calls] == [False, True]
    assert re.search(REMOTE_CODE, "x(trust_remote_code=True)")
    assert re.search(REMOTE_CODE, '{"trust_remote_code": True}')
    assert not re.search(REMOTE_CODE, "x(trust_remote_code=False)")
    assert not re.search(REMOTE_CODE, '{"trust_remote_code": False}')


def test_celery_accepts_json_only() -> None:
    from textcls.queue import celery_app

    assert list(celery_app().conf.accept_content) == ["json"]
    assert celery_app().conf.task_serializer == "json"


def test_secrets_come_only_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TEXTCLS_API_KEY", "TEXTCLS_PREDICT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.api_key is None and settings.predict_api_key is None
    for name in ("api_key", "predict_api_key"):
        assert Settings.model_fields[name].default is None
    assert "env_file" not in Settings.model_config or not Settings.model_config["env_file"]
    monkeypatch.setenv("TEXTCLS_API_KEY", "from-env")
    assert Settings().api_key == "from-env"
    # No key-looking literal in the code.
    literal = re.compile(r"""(api_key|password|secret|token)\s*[:=]\s*["'][^"']{6,}["']""", re.I)
    hits = [
        f"{p.relative_to(REPO)}: {m.group(0)}"
        for p in _sources()
        for m in literal.finditer(p.read_text(encoding="utf-8"))
    ]
    assert hits == []


def test_store_paths_come_from_ids_and_stay_inside(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.dataset_relpath(7) == "datasets/7.tsv"
    assert store.model_relpath("12") == "models/12"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.model_relpath("../../etc")  # type: ignore[arg-type]
    for escape in ("../x", "models/../../x", "/etc/passwd", "datasets/../../../etc"):
        with pytest.raises(ValueError, match="escapes"):
            store.resolve(escape)
    (tmp_path / "outside").mkdir()
    (tmp_path / "artifacts" / "models").mkdir(parents=True)
    (tmp_path / "artifacts" / "models" / "9").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="escapes"):
        store.resolve("models/9")
