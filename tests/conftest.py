"""Fixtures every test can use; the helpers themselves live in tests/support (see its README)."""

from tests.support.cli import cli, simulate_json  # noqa: F401  (fixtures, registered by import)
