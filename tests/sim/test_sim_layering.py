"""The planning core imports (and simulates) with torch blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
