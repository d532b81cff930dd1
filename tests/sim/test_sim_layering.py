"""The planning core imports (and simulates) with torch blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.imports import circles, import_graph

REPO = Path(__file__).resolve().parents[2]


def test_core_imports_and_simulates_without_torch() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import slimpipe.sim, slimpipe.schedule, slimpipe.config, slimpipe.cli, slimpipe.trace, slimpipe.plot
        import slimpipe.commands.simulate, slimpipe.commands.show, slimpipe.commands.plot
        from slimpipe.cli import main
        rc = main(["simulate", "--model", "llama-7b", "--seq-len", "8192", "--global-batch", "4", "--pp", "2",
                   "--slices", "2", "--json"])
        assert rc == 0
        assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules
                       if sys.modules[name] is not None)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_import_graph_is_acyclic() -> None:
    """No import circles among slimpipe's modules, function-level imports included (tests/support/imports):
    a lower layer never reaches up, not even lazily."""
    graph = import_graph()
    assert len(graph) > 50 and "slimpipe.schedule.actions" in graph["slimpipe.schedule.builders"]
    assert circles(graph) == []


def test_circle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    """Negative control: a circle closed only by an import inside a function is still a circle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from pkg.b import g\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import f  # re-exported from pkg.a\n    return f\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, package="pkg")
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
