"""Starting ranks three ways, and ending all of them when one dies.

* ``--nproc N``: this process forks N ranks (spawn on CUDA) that meet through a FileStore in a temp dir
  (no ports to race for), then waits; when one rank fails the others get ``timeout`` seconds to stop by
  themselves (naming the failed rank) before they are killed.
* torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR): one rank per process, env:// store.
* one process (``--nproc 1``, ``--local-pipeline``): the rank runs in this process.

The watchdog: every rank writes a heartbeat counter to the store; rank 0 watches all counters, the other
ranks watch rank 0's, and the first rank to see a failure writes an ``abort`` message that every rank polls.
A rank that raises publishes its own failure; a rank that vanishes is named by the stale heartbeat. A
process-group timeout remains the last resort for a rank that is alive but stuck.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["launch", "Watchdog", "fault_hook"]


class Watchdog:
    """Heartbeats through the rendezvous store; ``os._exit(1)`` with a message naming the dead rank."""

    def __init__(self, store: Any, rank: int, world: int, *, stale_s: float) -> None:
        import torch.distributed as dist

        self.store = dist.PrefixStore("slimpipe-watchdog", store)
        self.rank, self.world, self.stale_s = rank, world, stale_s
        self.interval = min(1.0, stale_s / 4)
        self._stop = threading.Event()
        self._published = False
        self._thread = threading.Thread(target=self._run, name="slimpipe-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def publish(self, message: str, *, own: bool = True) -> None:
        """Tell every rank to stop, naming the cause (the first published message wins).

        ``own=True``: this rank failed and its main thread reports it, so the watchdog lets it finish.
        """
        self._published = self._published or own
        try:
            self.store.compare_set("abort", "", message)
        except Exception:  # noqa: BLE001 - the store host may be the rank that died
            pass

    def abort_message(self) -> str | None:
        try:
            return self.store.get("abort").decode() if self.store.check(["abort"]) else None
        except Exception:  # noqa: BLE001
            return "rank 0 (the store host) is unreachable"

    def wait_for_cause(self) -> str | None:
        """After a communication error: wait up to stale_s for the watchdog to name a dead peer."""
        deadline = time.monotonic() + self.stale_s + 3 * self.interval
        while time.monotonic() < deadline:
            msg = self.abort_message()
            if msg:
                return msg
            time.sleep(self.interval / 2)
        return None

    def _run(self) -> None:
        watched = range(self.world) if self.rank == 0 else [0]
        last = {r: (b"", time.monotonic()) for r in watched if r != self.rank}
        beat = 0
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.store.set(f"hb{self.rank}", str(beat))
                for r, (val, since) in last.items():
                    now_val = self.store.get(f"hb{r}") if self.store.check([f"hb{r}"]) else b""
                    if now_val != val:
                        last[r] = (now_val, time.monotonic())
                    elif time.monotonic() - since > self.stale_s:
                        self.publish(f"rank {r} stopped responding (no heartbeat for {self.stale_s:.0f} s)", own=False)
                msg = self.abort_message()
            except Exception:  # noqa: BLE001 - store gone: its host died
                msg = "rank 0 (the store host) is unreachable"
            if msg and not self._published:
                _die(self.rank, f"stopping: {msg}")
            elif msg and self._published and self._stop.wait(2 * self.stale_s):
                return  # the main thread is reporting our own failure; give it time to finish


def _die(rank: int, message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"slimpipe train: rank {rank}: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def fault_hook(rank: int, step: int) -> None:
    """TEST HOOK: env SLIMPIPE_FAULT_RANK=r and SLIMPIPE_FAULT_STEP=k make rank r vanish at step k."""
    if os.environ.get("SLIMPIPE_FAULT_RANK") == str(rank) and os.environ.get("SLIMPIPE_FAULT_STEP") == str(step):
        sys.stderr.write(f"slimpipe train: rank {rank}: SLIMPIPE_FAULT_* test hook: exiting at step {step}\n")
        sys.stderr.flush()
        os._exit(13)


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
