"""Parallel state: the rank grid and the process groups, passed explicitly (no globals).

Grid ``arange(world).view(dp, pp)``: global rank = dp_rank·pp + pp_rank, so the ranks of one pipeline are
contiguous. Groups: one pipeline group per DP replica, two more over the same ranks for the forward
(activations) and backward (gradients) p2p channels (separate communicators, so the two directions never
queue behind each other and no tag is needed: NCCL ignores tags), a fourth for the attention context
exchange (runtime/exchange.py), a fifth for the vocabulary-parallel p2p messages (runtime/vocab_comm.py),
one DP group per pipeline rank, and
with pp > 1 an embedding group {first, last} per replica for tied embeddings. Every group carries the
timeout, so a dead peer becomes an error on every rank instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["ParallelState"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelState:
    """Where this process sits in the (dp, pp) grid, and its process groups."""

    rank: int
    """Global rank."""
    world: int
    """World size = pp·dp."""
    pp: int
    """p: pipeline-parallel size."""
    dp: int
    """d: data-parallel size."""
    pp_rank: int
    """Pipeline rank r in [0, pp)."""
    dp_rank: int
    """Data-parallel replica index in [0, dp)."""
    device: torch.device
    """cuda:<local rank> with NCCL, else cpu."""
    pp_group: object
    """The ranks of this pipeline (loss broadcast, grad-norm and statistics reductions)."""
    dp_group: object
    """The ranks holding the same stages in every replica (gradient all-reduce)."""
    fwd_group: object
    """The forward p2p channel (activations), same ranks as pp_group."""
    bwd_group: object
    """The backward p2p channel (gradients), same ranks as pp_group."""
    embed_group: object | None
    """{pp rank 0, pp rank p−1} of this replica when pp > 1 (tied-embedding gradient sum), else None."""
    timeout_s: float
    """Timeout of every group created here."""
    exchange_group: object = None
    """The attention-exchange channel (runtime/exchange.py), same ranks as pp_group."""
    vocab_group: object = None
    """Vocabulary-parallel VE/VB point-to-point messages (runtime/vocab_comm.py), same ranks as pp_group."""

    @classmethod
    def create(cls, *, pp: int, dp: int | None = None, timeout_s: float = 600.0) -> ParallelState:
        """Build the grid after ``torch.distributed.init_process_group`` (collective: call on every rank)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelState.create needs torch.distributed.init_process_group(...) first")
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = world // pp if dp is None else dp
        if pp < 1 or dp < 1 or pp * dp != world:
            raise ValueError(
                f"pp={pp} × dp={dp} must equal the world size {world}: fix --pp/--dp or the launch"
            )
        timeout = timedelta(seconds=timeout_s)
        grid = torch.arange(world).view(dp, pp)
        dp_rank, pp_rank = divmod(rank, pp)
        mine: dict[str, object] = {}
        # new_group is collective over the whole world: every rank creates every group, in the same order.
        for d in range(dp):
            ranks = grid[d].tolist()
            for name in ("pp", "fwd", "bwd", "exchange", "vocab"):
                g = dist.new_group(ranks, timeout=timeout)
                if d == dp_rank:
                    mine[name] = g
            if pp > 1:
                g = dist.new_group([ranks[0], ranks[-1]], timeout=timeout)
                if d == dp_rank:
                    mine["embed"] = g
        for r in range(pp):
            g = dist.new_group(grid[:, r].tolist(), timeout=timeout)
            if r == pp_rank:
                mine["dp"] = g
        return cls(
            rank=rank, world=world, pp=pp, dp=dp, pp_rank=pp_rank, dp_rank=dp_rank, device=_device(),
            pp_group=mine["pp"], dp_group=mine["dp"], fwd_group=mine["fwd"], bwd_group=mine["bwd"],
            embed_group=mine.get("embed"), timeout_s=timeout_s, exchange_group=mine["exchange"],
            vocab_group=mine["vocab"],
        )

    def global_rank(self, pp_rank: int) -> int:
        """Global rank of pipeline rank ``pp_rank`` in this replica."""
        return self.dp_rank * self.pp + pp_rank


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
