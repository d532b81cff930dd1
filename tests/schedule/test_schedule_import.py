"""The schedule core imports, builds, validates and formats with torch unavailable."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import slimpipe.schedule
from slimpipe.schedule import validate, lower, dry_run, to_grid, to_csv, from_csv
from slimpipe.schedule.builders import build
s = build("slimpipe", p=2, m=2, n=2, v=2)
validate(lower(s))
assert from_csv(to_csv(s)) == s
print(to_grid(s).splitlines()[1].split()[0], dry_run(s).makespan)
assert not any(k == "torch" or k.startswith("torch.") for k, v in sys.modules.items() if v is not None)
"""


def test_schedule_imports_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["rank0", "27.0"]  # 3·(m·n·v + p − 1): the closed form
