"""Run a ``textcls`` service command in-process and catch the command line it execs."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner


class Exec(Exception):
    """Raised in place of ``os.execv``; carries the argv."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv)
        self.argv = argv


def exec_argv(args: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ``textcls *args`` would exec (``os.execv`` is caught, nothing is started)."""
    from launch.cli import app

    def fake_execv(path: str, argv: list[str]) -> None:
        assert path == argv[0], (path, argv)
        raise Exec(list(argv))

    with monkeypatch.context() as m:
        m.setattr(os, "execv", fake_execv)
        result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, Exec), (args, result.output, result.exception)
    return result.exception.argv
