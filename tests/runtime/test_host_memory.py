"""runtime/host_memory.py: freed host memory stays in the process, so a step's buffers do not fault again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_PROBE = """
import resource, torch
from slimpipe.runtime.host_memory import retain_freed_host_memory
on = retain_freed_host_memory()
assert retain_freed_host_memory() == on  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):  # steps: allocate the buffers, touch them, free them
    before = faults()
    xs = [torch.ones(10 << 20) for _ in range(2)]  # 2 × 40 MiB: above the largest mmap threshold
    del xs
print(on, faults() - before)
"""


def _last_step_faults(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "SLIMPIPE_HOST_MALLOC"}
    if env_value is not None:
        env["SLIMPIPE_HOST_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.timeout(120)
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_memory_is_reused_without_page_faults() -> None:
    on, retained = _last_step_faults(None)
    off, default = _last_step_faults("default")
    assert on and not off
    # 80 MiB touched again: every page (20K) faulted back in by default (mmap); kept, none once the heap
    # has settled (the first steps may still place a block at its top: 0 or 10K in steps 2–3)
    assert default > 16000, default
    assert retained <= 2048, retained
