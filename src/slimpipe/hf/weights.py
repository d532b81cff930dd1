"""Loading Hugging Face Llama weights into any pipeline layout, each rank reading only what it holds.

Two steps per rank model:

1. :func:`rank_needs` says which *global slice* of each tensor the rank holds: the whole tensor for a
   layer it owns, rows [lo, lo + valid) of ``embed.weight``/``head.weight`` for a vocabulary shard (the
   shard's padding rows stay zero), the rank's column or row block of a tensor-parallel weight.
2. :func:`load_rank` reads exactly those slices with safetensors' lazy ``safe_open(...).get_slice``: the
   file is memory-mapped and only the requested bytes are touched, so a rank's peak host memory is its own
   parameters plus one slice in flight, never the checkpoint (BENCHMARKS.md "Hugging Face checkpoints").

A runtime exposes its rank models through :class:`HoldsRankModels` (``rank_models()``: one pair per
pipeline rank this process runs); :func:`load_hf_weights` loads all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from slimpipe.hf.config import HFCheckpoint
from slimpipe.runtime.vocab import VOCAB_SHARDED, VocabShard

__all__ = ["Need", "HoldsRankModels", "LoadStats", "rank_needs", "load_rank", "load_hf_weights"]


@dataclass(frozen=True, slots=True)
class Need:
    """The part of one global tensor a rank holds: (lo, hi) per dimension, in global coordinates.

    The local parameter may be larger than the slice (a vocabulary shard padded to ceil(V/p) rows): the
    slice fills its leading corner and the rest is zeroed."""

    ranges: tuple[tuple[int, int], ...]


class HoldsRankModels(Protocol):
    """A runtime whose per-rank modules can be filled from a checkpoint."""

    def rank_models(self) -> list[tuple[nn.Module, VocabShard | None]]:
        """(rank model with global parameter names, its vocabulary shard or None) per rank held here."""
        ...


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What one process read."""

    tensors: int
    """Slices read."""
    bytes_read: int
    """Bytes of those slices as stored in the files."""
    seconds: float
    """Wall time of the reads and copies."""


def rank_needs(model: nn.Module, shard: VocabShard | None) -> dict[str, Need]:
    """Global name → the slice of the checkpoint tensor this rank model holds.

    Tensor parallelism (``model.tp_shards``: name → Shard(dim, index, count)) holds the index-th equal
    block along ``dim`` (column-parallel rows, row-parallel columns, vocabulary rows when not
    vocabulary-parallel); a vocabulary shard (over t·p ranks under TP) holds rows [lo, lo + valid)."""
    tp_shards = getattr(model, "tp_shards", {})
    out: dict[str, Need] = {}
    for name, param in model.named_parameters():
        ranges = [(0, d) for d in param.shape]
        if shard is not None and name in VOCAB_SHARDED:
            ranges[0] = (shard.lo, shard.lo + shard.valid)
        elif name in tp_shards:
            piece = tp_shards[name]
            size = param.shape[piece.dim]
            ranges[piece.dim] = (piece.index * size, (piece.index + 1) * size)
        out[name] = Need(tuple(ranges))
    return out


def load_rank(ckpt: HFCheckpoint, model: nn.Module, needs: dict[str, Need]) -> LoadStats:
    """Fill ``model``'s parameters from ``ckpt``, reading only the slices in ``needs``."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    read = count = 0
    with torch.no_grad():
        for name, need in needs.items():
            src = ckpt.tensors.get(name)
            if src is None:
                raise KeyError(f"{name} is not in {ckpt.path}")
            index = tuple(slice(lo, hi) for lo, hi in need.ranges)
            # One mapping per tensor: its pages leave the process with the handle, so the resident set
            # grows by one slice at a time, not by every slice read from a file so far (measured).
            with safe_open(str(src.file), framework="pt", device="cpu") as fh:
                part = fh.get_slice(src.hf_name)[index]  # reads these bytes only
            dst = params[name]
            local = tuple(slice(0, hi - lo) for lo, hi in need.ranges)
            if tuple(part.shape) != tuple(dst.shape):
                dst.zero_()  # padding rows of a vocabulary shard
            dst[local].copy_(part)
            read += part.numel() * part.element_size()
            count += 1
            del part
    return LoadStats(tensors=count, bytes_read=read, seconds=time.perf_counter() - t0)


def load_hf_weights(runtime: HoldsRankModels, ckpt: HFCheckpoint) -> LoadStats:
    """Load every rank model this process holds; the runtime must have been built for ``ckpt.model``."""
    stats = [load_rank(ckpt, model, rank_needs(model, shard)) for model, shard in runtime.rank_models()]
    return LoadStats(tensors=sum(s.tensors for s in stats), bytes_read=sum(s.bytes_read for s in stats),
                     seconds=sum(s.seconds for s in stats))
