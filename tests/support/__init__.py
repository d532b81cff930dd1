"""Shared test support: import from here (``from tests.support.models import model, tokens``), never via
``sys.path`` edits. See tests/support/README.md for what each module holds and the rules for new tests."""
