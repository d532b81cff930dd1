"""`slimpipe` CLI fixtures (registered for every test by tests/conftest.py): run it in-process, parse its output."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from slimpipe.cli import main

__all__ = ["cli", "simulate_json"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """Run ``slimpipe <argv>`` in-process: (exit code, stdout, stderr)."""

    def _run(argv: list[str]) -> tuple[int, str, str]:
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture
def simulate_json(cli) -> Callable[..., dict]:
    """Run ``slimpipe simulate <argv> --json``; assert success and exactly one JSON object."""

    def _run(*argv: str) -> dict:
        code, out, err = cli(["simulate", *argv, "--json"])
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, "--json must print exactly one JSON object"
        return json.loads(lines[0])

    return _run
