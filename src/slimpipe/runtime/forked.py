"""Run a function on N single-threaded ranks of this machine (tests, benchmarks, calibration).

The one multi-process harness of the project (the platform notes' recipe): fork (about 0.1 s per group,
against seconds for spawn), a FileStore rendezvous (no ports), ``torch.set_num_threads(1)`` first in
every child (libgomp hangs after fork with more threads) and a process-group timeout so a dead peer
becomes an error. Where CUDA is initialised-capable the parent's autograd engine may already run device
threads, and a forked child then refuses to run backward: ``start_method=None`` picks spawn there (the
body and its arguments must then be importable/picklable, as for any spawned process).

An exception on any rank reaches the caller as torch's ``ProcessRaisedException`` with the rank's
message, so ``pytest.raises(..., match=...)`` works on it.
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

__all__ = ["run_forked", "default_start_method"]


def default_start_method() -> str:
    """fork where it is safe (no CUDA), spawn otherwise."""
    return "spawn" if torch.cuda.is_available() else "fork"


def _child(rank: int, world: int, tmp: str, timeout_s: float, gloo: bool, body: Callable,
           args: tuple) -> None:
    torch.set_num_threads(1)  # first: libgomp after fork hangs with more threads
    if gloo:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    try:
        result = body(rank, world, *args)
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    finally:
        if gloo:
            dist.destroy_process_group()


def run_forked(body: Callable, world: int, *args: object, timeout_s: float = 300.0, gloo: bool = True,
               start_method: str | None = None) -> list[object]:
    """``body(rank, world, *args)`` on ``world`` ranks; each rank's (picklable) return value, by rank.

    gloo: join a gloo process group first (FileStore rendezvous, ``timeout_s``); False runs the bodies
    as plain concurrent processes (calibration's compute measurements). start_method: ``fork`` or
    ``spawn``; None picks :func:`default_start_method`.
    """
    method = start_method or default_start_method()
    if method not in ("fork", "spawn"):
        raise ValueError(f"start_method={method!r} is unknown: use 'fork' or 'spawn'")
    with tempfile.TemporaryDirectory() as tmp:
        # A process group left in a garbage cycle by an earlier in-process run must die here, where its
        # worker threads exist: a forked child's GC would run its destructor and wait forever on threads
        # fork did not copy. Freezing keeps the children's GC off everything inherited.
        gc.collect()
        gc.freeze()
        try:
            mp.start_processes(_child, args=(world, tmp, timeout_s, gloo, body, args), nprocs=world,
                               start_method=method, join=True)
        finally:
            gc.unfreeze()
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as fh:
                out.append(pickle.load(fh))
        return out
