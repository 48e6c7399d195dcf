"""The documented dependency direction, as a test that walks every import.

launcher (``launch``) → services (``api``, ``workers``, ``deploy``) → shared core
(``textcls``) and ``pipeline``. An import may only go down a layer (or more),
never up or sideways: the core and ``pipeline`` import no other project
package, the services none of each other. Imports inside functions and
``importlib.import_module("…")`` strings count too, and no module imports
itself back through others (no cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"launch": 3, "api": 2, "workers": 2, "deploy": 2, "textcls": 1, "pipeline": 1}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.add(module)
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            out.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value)
    return out


def import_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        src_pkg = src.split(".")[0]
        for dst in sorted(targets):
            dst_pkg = dst.split(".")[0]
            if dst_pkg != src_pkg and LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                bad.append(f"{src} imports {dst}")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_package_is_walked() -> None:
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(LAYERS)
    # The walk sees imports inside functions too (the handlers import pipeline lazily).
    assert any(m.startswith("pipeline.") for m in graph["workers.handlers"])


def test_dependencies_run_one_way() -> None:
    assert layer_violations(import_graph()) == []


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("graph", "violations", "cyclic"),
    [
        ({"textcls.a": {"workers.b"}, "workers.b": set()}, ["textcls.a imports workers.b"], False),
        ({"api.a": {"workers.b"}, "workers.b": set()}, ["api.a imports workers.b"], False),
        (
            {"pipeline.a": {"textcls.b"}, "textcls.b": set()},
            ["pipeline.a imports textcls.b"],
            False,
        ),
        ({"launch.a": {"api.b"}, "api.b": {"textcls.c"}, "textcls.c": set()}, [], False),
        ({"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a"}}, [], True),
    ],
)
def test_the_checks_catch_what_they_should(
    graph: dict[str, set[str]], violations: list[str], cyclic: bool
) -> None:
    assert layer_violations(graph) == violations
    assert (find_cycle(graph) is not None) == cyclic


def test_relative_and_string_imports_are_seen(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    src = pkg / "mod.py"
    src.write_text(
        "from . import sibling\nfrom .other import thing\n"
        "def f():\n    import importlib\n    importlib.import_module('pipeline.prune')\n"
    )
    assert {"pkg.sibling", "pkg.other", "pipeline.prune"} <= _imports(src, "pkg.mod")
