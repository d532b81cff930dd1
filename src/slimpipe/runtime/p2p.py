"""Point-to-point transport behind the SEND/RECV actions: torch.distributed or in-memory channels.

Two channels, ``fwd`` (activations, downstream) and ``bwd`` (gradients, upstream). Shapes and dtypes are
known from the schedule and the model, so a receiver allocates its buffer itself and nothing is
negotiated per message. The lowering pass emits sends and receives in the same order per (src, dst) pair
and channel, so messages match by order alone: tags are never used (NCCL ignores them).

The executor asks ``ready`` before a RECV: the distributed transport always says yes (its receive blocks,
bounded by the group timeout); the in-memory one says no while the queue is empty, so the local runtime
can run another rank instead (cooperative round-robin).

The executor also ``post``s each channel's next receive as soon as the previous one completed (one
ahead, one buffer per channel). On gloo a receive posted only when its RECV runs pays a rendezvous after
the sender's notice (the busy sender's progress thread must answer): 1–7 ms per late receive on a shared
2-core machine, 44–48 of them per step in slimpipe n8 at s = 512, about a sixth of that step
(BENCHMARKS.md "Simulator validation", E). NCCL runs the p2p operations of a communicator in issue order
on one stream, so an early receive would hold the rank's later sends behind it (a wrap-around program can
then deadlock): there ``post`` does nothing and the receive is posted at its RECV, as before.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch
import torch.distributed as dist

from slimpipe.runtime.parallel_state import ParallelState

__all__ = ["Transport", "DistTransport", "LocalHub", "LocalTransport", "CHANNELS"]

CHANNELS = ("fwd", "bwd")


class Transport(Protocol):
    def send(self, channel: str, tensor: torch.Tensor, dst: int) -> None:
        """Queue ``tensor`` (contiguous) for pipeline rank ``dst``; never blocks."""
        ...

    def ready(self, channel: str, src: int) -> bool:
        """Whether a recv from ``src`` can complete without waiting on another local rank."""
        ...

    def recv(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """The next message from pipeline rank ``src`` on ``channel``."""
        ...

    def post(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> None:
        """Start the next receive from ``src`` on ``channel`` early (its ``recv`` then completes it); a
        transport may ignore it. Posts follow the program's receive order per channel."""
        ...

    def finish(self) -> None:
        """Wait for every outstanding send (end of step)."""
        ...


class DistTransport:
    """isend/irecv over the pipeline's forward and backward process groups."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state
        self._groups = {"fwd": state.fwd_group, "bwd": state.bwd_group}
        self._pending: list[tuple[object, torch.Tensor]] = []  # (work, tensor kept alive until sent)
        self._posted: dict[tuple[str, int], deque[tuple[object, torch.Tensor]]] = {}  # early receives
        self._early = dist.get_backend(state.fwd_group) == "gloo"  # see the module docstring

    def send(self, channel: str, tensor: torch.Tensor, dst: int) -> None:
        if not tensor.is_contiguous():  # gloo raises on non-contiguous tensors and the peer then hangs
            raise ValueError("p2p tensors must be contiguous")
        work = dist.isend(tensor, dst=self.state.global_rank(dst), group=self._groups[channel])
        self._pending.append((work, tensor))
        # Drop completed sends as we go so the kept-alive tensors do not pile up over a step.
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]  # type: ignore

    def ready(self, channel: str, src: int) -> bool:
        return True

    def recv(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        posted = self._posted.get((channel, src))
        if posted:
            work, buf = posted.popleft()
            if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
                raise RuntimeError(f"{channel} receive from rank {src} was posted as {tuple(buf.shape)} "
                                   f"{buf.dtype}, its RECV expects {tuple(shape)} {dtype}: posts out of order")
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.state.device)
            work = dist.irecv(buf, src=self.state.global_rank(src), group=self._groups[channel])
        work.wait()  # type: ignore[attr-defined]
        return buf

    def post(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> None:
        if not self._early:
            return
        buf = torch.empty(shape, dtype=dtype, device=self.state.device)
        work = dist.irecv(buf, src=self.state.global_rank(src), group=self._groups[channel])
        self._posted.setdefault((channel, src), deque()).append((work, buf))

    def finish(self) -> None:
        for work, _ in self._pending:
            work.wait()  # type: ignore[attr-defined]
        self._pending.clear()
        left = {key: len(q) for key, q in self._posted.items() if q}
        if left:
            raise RuntimeError(f"receives posted but never taken at the end of the step: {left}")


class LocalHub:
    """In-memory FIFO queues per (channel, src, dst) shared by the ranks of one local pipeline."""

    def __init__(self) -> None:
        self.queues: dict[tuple[str, int, int], deque[torch.Tensor]] = {}

    def queue(self, channel: str, src: int, dst: int) -> deque[torch.Tensor]:
        return self.queues.setdefault((channel, src, dst), deque())

    def pending(self) -> list[str]:
        return [f"{c} {s}->{d}: {len(q)}" for (c, s, d), q in sorted(self.queues.items()) if q]


class LocalTransport:
    """One rank's endpoint on a LocalHub. Hands over the tensor itself (no copy)."""

    def __init__(self, hub: LocalHub, rank: int) -> None:
        self.hub, self.rank = hub, rank

    def send(self, channel: str, tensor: torch.Tensor, dst: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("p2p tensors must be contiguous")
        self.hub.queue(channel, self.rank, dst).append(tensor)

    def ready(self, channel: str, src: int) -> bool:
        return bool(self.hub.queue(channel, src, self.rank))

    def recv(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        q = self.hub.queue(channel, src, self.rank)
        if not q:
            raise RuntimeError(f"rank {self.rank}: recv on {channel} from rank {src} with nothing queued")
        t = q.popleft()
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            # On a real transport this would be a silent mismatch or a hang: fail loudly here.
            raise RuntimeError(
                f"rank {self.rank}: {channel} message from rank {src} has shape {tuple(t.shape)} {t.dtype}, "
                f"expected {tuple(shape)} {dtype}: sends and receives are out of order"
            )
        return t.detach()

    def post(self, channel: str, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> None:
        return None  # in memory a message waits in its queue: nothing to start early

    def finish(self) -> None:
        return None
