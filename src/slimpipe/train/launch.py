"""Starting ranks three ways, and ending all of them when one dies.

* ``--nproc N``: this process forks N ranks (spawn on CUDA) that meet through a FileStore in a temp dir
  (no ports to race for), then supervises them (train/supervise.py): when one rank fails the others get a
  few seconds to stop by themselves before they are killed, and one line names the rank that failed
  first; SIGTERM/SIGINT are passed on to every rank, and the ranks die with the launcher (signals.py).
* torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR): one rank per process, env:// store;
  the rank ends at once on SIGTERM/SIGINT and when its agent dies.
* one process (``--nproc 1``, ``--local-pipeline``): the rank runs in this process.

The watchdog that ends every rank when one dies is train/watchdog.py; a rank that stops because of another
exits PEER, quietly under our launcher.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from slimpipe.train.signals import (
    Stopped, die_with_parent, exit_on_signals, forward_signals, raise_on_signals,
)
from slimpipe.train.supervise import Outcome, report, supervise

__all__ = ["launch"]


def _threads(cfg: Any, local_procs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cfg.threads or max(1, cores // local_procs)


def _child(rank: int, world: int, prep: Any, store_path: str, threads: int, launcher: int) -> None:
    exit_on_signals(None)  # before any thread starts; quiet: the launcher reports
    die_with_parent(launcher)
    import torch

    torch.set_num_threads(threads)  # first: forked children with >1 OpenMP thread can hang (libgomp)
    os.environ["LOCAL_RANK"] = str(rank)  # what ParallelState reads to pick cuda:<local rank>
    import torch.distributed as dist

    from slimpipe.train.trainer import run_rank

    if prep.data is None:  # spawned: reload the data rather than pickling a memmap
        from slimpipe.train.preflight import preflight

        prep = preflight(prep.cfg, check_outputs=False, evaluation=prep.evaluation)
    store = dist.FileStore(store_path, world)
    code = run_rank(prep, rank=rank, world=world, local_rank=rank, store=store, supervised=True)
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
        exit_on_signals(lambda signum: f"slimpipe train: rank {env.rank}: stopped by "
                                       f"{signal.Signals(signum).name}; nothing published")
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent is the parent; other launchers may exit
            die_with_parent(os.getppid())
        torch.set_num_threads(_threads(cfg, env.local_world))
        store, rank, world = next(dist.rendezvous("env://"))
        return run_rank(prep, rank=rank, world=world, local_rank=env.local_rank, store=store)
    nproc = cfg.world
    tmp = tempfile.mkdtemp(prefix="slimpipe-rdzv-")
    try:
        if nproc == 1:
            torch.set_num_threads(_threads(cfg, 1))
            try:
                with raise_on_signals():
                    store = dist.FileStore(f"{tmp}/store", 1)
                    return run_rank(prep, rank=0, world=1, local_rank=0, store=store)
            except Stopped as stop:
                return report(Outcome(codes={0: 128 + stop.signum}, order=[0], signal=stop.signum), cfg)
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
    child_prep = prep if not cuda else dataclasses.replace(prep, data=None)  # spawned ranks reload data
    sys.stdout.flush()
    sys.stderr.flush()
    args = (nproc, child_prep, store_path, _threads(cfg, nproc), os.getpid())
    procs = [ctx.Process(target=_child, args=(r, *args), daemon=False) for r in range(nproc)]
    # A process group left in a garbage cycle (an earlier run in this process) must be destroyed here,
    # where its worker threads exist: a forked child's GC would run its destructor and wait forever on
    # threads that fork did not copy. Freezing keeps the children's GC off everything inherited.
    with forward_signals() as received:  # from before the first fork: no signal slips between
        gc.collect()
        gc.freeze()
        try:
            for p in procs:
                p.start()
        finally:
            gc.unfreeze()
        outcome = supervise(procs, received)
    return report(outcome, cfg)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
