"""Starting ranks three ways, and ending all of them when one dies.

* ``--nproc N``: this process forks N ranks (spawn on CUDA) that meet through a FileStore in a temp dir
  (no ports to race for), then waits; when one rank fails the others get ``timeout`` seconds to stop by
  themselves (naming the failed rank) before they are killed.
* torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR): one rank per process, env:// store.
* one process (``--nproc 1``, ``--local-pipeline``): the rank runs in this process.

The watchdog that ends every rank when one dies is train/watchdog.py.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from typing import Any

__all__ = ["launch"]


def _threads(cfg: Any, local_procs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cfg.threads or max(1, cores // local_procs)


def _child(rank: int, world: int, prep: Any, store_path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # first: forked children with >1 OpenMP thread can hang (libgomp)
    os.environ["LOCAL_RANK"] = str(rank)  # what ParallelState reads to pick cuda:<local rank>
    import torch.distributed as dist

    from slimpipe.train.trainer import run_rank

    if prep.data is None:  # spawned: reload the data rather than pickling a memmap
        from slimpipe.train.preflight import preflight

        prep = preflight(prep.cfg, check_outputs=False)
    store = dist.FileStore(store_path, world)
    code = run_rank(prep, rank=rank, world=world, local_rank=rank, store=store)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip atexit handlers inherited from the parent (pytest, torch)


def launch(prep: Any, *, env: Any = None) -> int:
    """Run the prepared job in the way the environment asks for; returns the exit code."""
    import torch
    import torch.distributed as dist

    from slimpipe.train.trainer import run_rank

    cfg = prep.cfg
    if env is not None:  # torchrun: this process is one rank
        torch.set_num_threads(_threads(cfg, env.local_world))
        store, rank, world = next(dist.rendezvous("env://"))
        return run_rank(prep, rank=rank, world=world, local_rank=env.local_rank, store=store)
    nproc = cfg.world
    tmp = tempfile.mkdtemp(prefix="slimpipe-rdzv-")
    try:
        if nproc == 1:
            torch.set_num_threads(_threads(cfg, 1))
            return run_rank(prep, rank=0, world=1, local_rank=0, store=dist.FileStore(f"{tmp}/store", 1))
        return _run_children(prep, nproc, f"{tmp}/store")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_children(prep: Any, nproc: int, store_path: str) -> int:
    import torch.multiprocessing as mp

    cfg = prep.cfg
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and _cuda_available())
    ctx = mp.get_context("spawn" if cuda else "fork")  # CUDA cannot be used after fork
    if not cuda:  # import once here rather than once per forked child (seconds each on a busy CPU)
        import slimpipe.runtime  # noqa: F401
        if cfg.checkpoint_every or prep.resume_dir is not None:
            import torch.distributed.checkpoint  # noqa: F401
    child_prep = prep if not cuda else type(prep)(cfg, prep.model, prep.schedule, None, prep.resume_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    procs = [ctx.Process(target=_child, args=(r, nproc, child_prep, store_path, _threads(cfg, nproc)),
                         daemon=False) for r in range(nproc)]
    # A process group left in a garbage cycle (an earlier run in this process) must be destroyed here,
    # where its worker threads exist: a forked child's GC would run its destructor and wait forever on
    # threads that fork did not copy. Freezing keeps the children's GC off everything inherited.
    gc.collect()
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    try:
        first, stop_s = _wait(procs, grace_s=cfg.timeout + 5)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)
        sys.stderr.write("slimpipe train: interrupted\n")
        return 130
    if first is None:
        return 0
    others = [r for r, p in enumerate(procs) if r != first[0] and p.exitcode != 0]
    sys.stderr.write(
        f"slimpipe train: error: rank {first[0]} failed first (exit code {first[1]}); "
        f"{len(others)} other rank(s) stopped within {stop_s:.1f} s: {others}\n"
    )
    return 1


def _wait(procs: list[Any], *, grace_s: float) -> tuple[tuple[int, int] | None, float]:
    """Wait for every rank: ((rank, exit code) of the first failure or None, seconds the others took to stop
    after it). After a failure the others get ``grace_s`` to stop by themselves (their watchdogs name the
    failed rank) before they are killed."""
    first: tuple[int, int] | None = None
    deadline = failed_at = float("inf")
    while any(p.exitcode is None for p in procs):
        for r, p in enumerate(procs):
            if first is None and p.exitcode not in (None, 0):
                first, failed_at = (r, p.exitcode), time.monotonic()
                deadline = failed_at + grace_s
        if time.monotonic() > deadline:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
        time.sleep(0.1)
    for p in procs:
        p.join()
    stop_s = max(0.0, time.monotonic() - failed_at)
    if first is None:  # every rank ended between two polls: take the lowest failed rank
        first = next(((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0), None)
    return first, stop_s


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
