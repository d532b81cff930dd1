"""Run a function on N forked single-threaded gloo ranks in this machine (tests, benchmarks, calibration).

The fast multi-process harness of the platform notes: fork (about 0.1 s per group, against seconds for
spawn), a FileStore rendezvous (no ports), ``torch.set_num_threads(1)`` first in every child (libgomp
hangs after fork with more threads) and a process-group timeout so a dead peer becomes an error.
"""

from __future__ import annotations

import gc
import os
import pickle
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_forked"]


def _child(rank: int, world: int, tmp: str, timeout_s: float, body: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # first: libgomp after fork hangs with more threads
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = body(rank, world, *args)
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


def run_forked(body: Callable, world: int, *args: object, timeout_s: float = 300.0) -> list[object]:
    """``body(rank, world, *args)`` on ``world`` forked gloo ranks; each rank's (picklable) return value."""
    with tempfile.TemporaryDirectory() as tmp:
        # A process group left in a garbage cycle by an earlier in-process run must die here, where its
        # worker threads exist: a forked child's GC would run its destructor and wait forever on threads
        # fork did not copy. Freezing keeps the children's GC off everything inherited.
        gc.collect()
        gc.freeze()
        try:
            mp.start_processes(_child, args=(world, tmp, timeout_s, body, args), nprocs=world,
                               start_method="fork", join=True)
        finally:
            gc.unfreeze()
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as fh:
                out.append(pickle.load(fh))
        return out
