"""Keep freed host memory in the process (glibc): a CPU training step must not page-fault its buffers back in.

glibc's malloc serves large blocks with ``mmap`` (above a threshold that adapts up to 32 MiB) and gives the
top of its heap back to the kernel once more than a threshold is free. A pipeline rank frees most of
its activations at the end of every step and allocates them again in the next, so each step touched
fresh pages again: on the development VM the interleaved-1F1B rank holding the head at s = 4096 took
2.4K–17K minor page faults per step (the other schedules 4–40), and its F/B thread CPU time was
1.10–1.19× what the calibrated cost model predicts (1.02–1.06× with memory kept; steps 0.89–1.00×). That is what CUDA's caching allocator
avoids on GPUs; on CPU the cheapest equivalent is to tell glibc to keep what it has (``mallopt``): no
``mmap`` for blocks (``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` at its maximum). The
process's resident memory then stays at its peak, which is what a training job holds anyway.
BENCHMARKS.md "Simulator validation", F has the measurement.

Set ``SLIMPIPE_HOST_MALLOC=default`` to leave glibc's behaviour alone; other C libraries (and a preloaded
allocator such as jemalloc, which ignores glibc's settings) are left alone too.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["retain_freed_host_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_done: list[bool] = []  # once per process (forked children inherit both the setting and the flag)


def retain_freed_host_memory() -> bool:
    """Configure glibc's malloc to keep freed memory (idempotent); whether the setting is in effect."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("SLIMPIPE_HOST_MALLOC", "") != "default" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            ok = False
    _done.append(ok)
    return ok
