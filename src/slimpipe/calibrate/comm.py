"""Point-to-point link measurements: latency and bandwidth.

CPU: two forked single-threaded gloo ranks ping-pong (``latency + bytes / bandwidth``, both ranks waiting
for the message). What each message costs the sending and receiving *ranks* is measured in the 2-rank
executor run instead (calibrate/executor.py), where the runtime pays it.

CUDA: one GPU cannot run a 2-rank NCCL pipeline, so a device-to-device copy stands in for the link and the
message costs are not measured (0).

Tensor parallelism (CPU): four forked gloo ranks time the sequence-parallel all-gather and reduce-scatter
of runtime/tensor_parallel.py in TP groups of 2 and of 4, at several slice sizes; the fit (fit.py) is a
ring, ``latency·(T−1) + bytes·(T−1)/T / bandwidth``, the form the simulator charges per collective.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["fork_gloo", "TP_SIZES"]

TP_SIZES = (2, 4)
"""TP group sizes calibrate times (on 4 forked ranks)."""


def fork_gloo(body: Callable, world: int, *args: object, timeout_s: float = 300.0) -> list[object]:
    """``body(rank, world, *args)`` on ``world`` forked single-threaded gloo ranks; their return values."""
    from slimpipe.runtime.forked import run_forked

    return run_forked(body, world, *args, timeout_s=timeout_s)


def _ping_pong(sizes: Sequence[int], rank: int) -> list[dict]:
    out = []
    for size in sizes:
        buf = torch.zeros(max(1, size // 4), dtype=torch.float32)
        reps = max(3, min(30, (1 << 24) // size))
        times = []
        for r in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if r:
                times.append(time.perf_counter() - t0)
        out.append({"bytes": buf.numel() * 4, "one_way_s": statistics.median(times) / 2})
    return out


def _gloo_body(rank: int, world: int, sizes: Sequence[int]) -> list[dict]:
    return _ping_pong(sizes, rank)


def _measure_p2p(dev: torch.device, sizes: Sequence[int], reps: int) -> list[dict]:
    """Link ping-pong points; wall time (a transfer is waiting, not computing)."""
    if dev.type == "cpu":
        return fork_gloo(_gloo_body, 2, sizes, timeout_s=120.0)[0]  # type: ignore[return-value]
    out = []  # one GPU: a device-to-device copy stands in for the NVLink/NCCL p2p it cannot run
    for size in sizes:
        a = torch.empty(size, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        out.append({"bytes": size, "one_way_s": statistics.median(times)})
    return out


def _tp_body(rank: int, world: int, sizes: Sequence[int], reps: int) -> list[dict]:
    """Median seconds of one all_gather_seq / reduce_scatter_seq per (T, full-slice bytes), this rank."""
    from slimpipe.runtime.tensor_parallel import TensorParallel, all_gather_seq, reduce_scatter_seq

    out = []
    for t in TP_SIZES:
        members = [list(range(g, g + t)) for g in range(0, world, t)]
        group, _ = dist.new_subgroups_by_enumeration(members)
        tp = TensorParallel(group=group, size=t, rank=rank % t)
        for size in sizes:
            tokens = max(t, size // (4 * 64) // t * t)  # (1, tokens, 64) float32: `size` bytes in all
            shard = torch.zeros(1, tokens // t, 64)
            full = torch.zeros(1, tokens, 64)
            for op, fn, x in (("all_gather", all_gather_seq, shard), ("reduce_scatter", reduce_scatter_seq, full)):
                times = []
                for r in range(reps + 1):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn(x, tp)
                    if r:
                        times.append(time.perf_counter() - t0)
                out.append({"tp": t, "op": op, "bytes": tokens * 64 * 4, "s": statistics.median(times)})
    return out


def _measure_tp(sizes: Sequence[int], reps: int) -> list[dict]:
    """Per (T, op, bytes): the slowest rank's median time (the collective ends when the last rank has it)."""
    ranks = fork_gloo(_tp_body, max(TP_SIZES), sizes, reps, timeout_s=120.0)
    out = []
    for points in zip(*ranks):  # type: ignore[call-overload]
        out.append({**points[0], "s": max(p["s"] for p in points)})
    return out
