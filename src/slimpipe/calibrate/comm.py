"""Point-to-point link measurements: latency and bandwidth.

CPU: two forked single-threaded gloo ranks ping-pong (``latency + bytes / bandwidth``, both ranks waiting
for the message). What each message costs the sending and receiving *ranks* is measured in the 2-rank
executor run instead (calibrate/executor.py), where the runtime pays it.

CUDA: one GPU cannot run a 2-rank NCCL pipeline, so a device-to-device copy stands in for the link and the
message costs are not measured (0).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["fork_gloo"]


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
