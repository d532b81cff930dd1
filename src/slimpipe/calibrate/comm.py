"""Point-to-point measurements: link latency and bandwidth, and the rank time each message costs.

CPU: two forked single-threaded gloo ranks. The ping-pong gives the link (``latency + bytes /
bandwidth``, both ranks waiting for the message). The message costs are what a pipeline rank pays on its
own timeline, measured through the runtime's DistTransport while both ranks compute between messages,
as they do in a pipeline:

* send: the ``isend`` call (gloo posts a send notice; the bytes move later);
* receive: a receive posted *after* its message was sent. gloo's unbound buffers rendezvous, so the
  receiver's ready notice must reach the sender, whose progress thread (competing with the sender's
  compute for a core) then writes the bytes: a round trip and a wake-up on a busy machine, paid even when
  the message was sent long before. The cost model charged neither before (a SEND took no rank time, a
  RECV of an early message none).

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

_BUSY_S = 4e-3
"""Compute between messages in the message-cost measurement: the receiver asks this long after the send."""


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


def _spin(seconds: float) -> None:
    """Keep this rank's core busy, as a pipeline rank computing between messages."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _message_costs(sizes: Sequence[int], reps: int, rank: int, world: int) -> list[dict]:
    """This rank's wall time in DistTransport.send and in a late DistTransport.recv, per size.

    The ranks swap roles every repetition; the sender keeps computing while the receiver asks.
    """
    from slimpipe.runtime.p2p import DistTransport
    from slimpipe.runtime.parallel_state import ParallelState

    transport = DistTransport(ParallelState.create(pp=world, timeout_s=120.0))
    out = []
    for size in sizes:
        buf = torch.zeros(max(1, size // 4), dtype=torch.float32)
        send, recv = [], []
        for r in range(2 * reps + 2):  # the first round each way warms up
            dist.barrier()
            peer = 1 - rank
            if r % 2 == rank:
                t0 = time.perf_counter()
                transport.send("fwd", buf, peer)
                dt = time.perf_counter() - t0
                _spin(3 * _BUSY_S)  # the next unit, while the peer asks for this message
                transport.finish()
                if r >= 2:
                    send.append(dt)
            else:
                _spin(_BUSY_S)  # still computing when the message is sent
                t0 = time.perf_counter()
                transport.recv("fwd", tuple(buf.shape), buf.dtype, peer)
                if r >= 2:
                    recv.append(time.perf_counter() - t0)
        out.append({"bytes": buf.numel() * 4, "send_s": send, "recv_s": recv})
    return out


def _gloo_body(rank: int, world: int, sizes: Sequence[int], msg_sizes: Sequence[int],
               reps: int) -> tuple[list[dict], list[dict]]:
    return _ping_pong(sizes, rank), _message_costs(msg_sizes, reps, rank, world)


def _measure_p2p(dev: torch.device, sizes: Sequence[int], reps: int) -> tuple[list[dict], list[dict]]:
    """(link ping-pong points, message-cost points); wall time (a transfer is waiting, not computing)."""
    if dev.type == "cpu":
        msg_sizes = [s for s in sizes if s <= 1 << 20]  # the copy must finish within the peer's compute
        ranks = fork_gloo(_gloo_body, 2, sizes, msg_sizes, max(reps, 8), timeout_s=120.0)
        link, costs = ranks[0][0], []  # type: ignore[index]
        for size, a, b in zip(msg_sizes, ranks[0][1], ranks[1][1]):  # type: ignore[index]
            costs.append({"bytes": a["bytes"], "send_s": statistics.median(a["send_s"] + b["send_s"]),
                          "recv_s": statistics.median(a["recv_s"] + b["recv_s"])})
        return link, costs
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
    return out, []
