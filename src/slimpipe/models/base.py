"""The user-model contract: what slimpipe needs to pipeline a decoder-only transformer.

A decoder is three kinds of parts, named globally whatever the pipeline layout:

* ``embed``: an ``nn.Module`` mapping token ids ``(b, t)`` to hidden states ``(b, t, h)``;
* ``layers.<i>`` for i in [0, L): blocks mapping ``(x (b, t, h), ctx: LayerContext)`` to ``(b, t, h)``;
  a block's attention hands its post-positional-encoding q, k, v to ``ctx.attend`` (which adds the K/V
  prefix of earlier slices and the causal mask) and takes positions from ``ctx.positions`` (the global
  positions of its tokens, under context parallelism) or else ``ctx.start`` (the global position of the
  slice's first token, its tokens following on);
* ``norm`` and ``head``: the final norm ``(b, t, h) → (b, t, h)`` and the output layer
  ``(b, t, h) → (b, t, V)``; with tied embeddings the head reads the embedding's weight.

:class:`slimpipe.models.llama.LlamaParts` is one instance of :class:`DecoderParts`; docs/runtime.md shows a
user-defined one. Initial weights come from :func:`init_parameters`, which depends only on (seed, global
parameter name), so every pipeline layout starts from identical weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["LayerContext", "DecoderParts", "init_parameters", "param_generator", "PlainContext", "Shard"]


@runtime_checkable
class LayerContext(Protocol):
    """What a block sees of the slice it processes (one per layer and slice)."""

    start: int
    """Global position of the slice's first token (RoPE positions are global, not per slice)."""
    positions: torch.Tensor | None
    """Positions (t,) of the tokens this rank holds of the slice when they are not [start, start + t):
    context parallelism's zig-zag pieces (runtime/context_parallel.py), or packed documents' positions
    counted from each document's start (runtime/documents.py). None otherwise."""
    shared: dict[str, object]
    """Per-slice scratch shared by the layers of one stage (e.g. RoPE tables computed once per slice)."""
    recompute: str
    """Activation recompute mode of the run (none, partial, partial+fc1, full; slimpipe.sim.memory's
    definitions). ``full`` is applied by the runtime around the whole block; a block that implements the
    partial modes lists them in a ``recompute_modes`` class attribute and runs its regions through
    :meth:`checkpoint`."""

    def checkpoint(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        """``fn(*args)`` whose saved tensors are dropped after the forward and replayed in the backward
        (non-reentrant ``torch.utils.checkpoint``); a replay reads this slice's K/V prefix from the store
        and never writes it."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the slice's queries over the K/V of this and all earlier slices.

        q ``(b, t, H, d)``, k and v ``(b, t, H_kv, d)`` after positional encoding; returns ``(b, t, H, d)``.
        """
        ...


@runtime_checkable
class DecoderParts(Protocol):
    """A factory of the parts of a decoder (see the module docstring for the contract)."""

    num_layers: int
    """L: number of blocks."""
    hidden: int
    """h: width of the hidden states passed between stages."""
    vocab_size: int
    """V: output classes."""
    tie_embeddings: bool
    """The head reads the embedding's weight (grads of both stages are summed)."""

    def embedding(self) -> nn.Module: ...

    def block(self, index: int) -> nn.Module: ...

    def final_norm(self) -> nn.Module: ...

    def head(self, tied: nn.Module | None) -> nn.Module:
        """The output layer; ``tied`` is the embedding module when tie_embeddings, else None."""
        ...

    def init_parameter(self, name: str, param: torch.Tensor, generator: torch.Generator) -> None:
        """Fill ``param`` (float32, CPU) in place from ``generator``; ``name`` is the global name."""
        ...


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, crc32 of the global name): layout-independent initial weights.

    The CPU generator (mt19937) keeps only 32 bits of its seed, so seed and name are mixed into one 32-bit
    value: the CRC-32 of the name started from the seed's low 32 bits.
    """
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), int(seed) & 0xFFFFFFFF))


@dataclass(frozen=True, kw_only=True, slots=True)
class Shard:
    """One rank's equal piece of a parameter along one dimension (tensor parallelism)."""

    dim: int
    """The split dimension (0: rows / output features, 1: columns / input features)."""
    index: int
    """Which piece this rank holds, in [0, count)."""
    count: int
    """Pieces: the tensor-parallel size T."""

    def full_shape(self, local: Iterable[int]) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] *= self.count
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor (a view)."""
        size = full.size(self.dim) // self.count
        return full.narrow(self.dim, self.index * size, size)


def init_parameters(parts: DecoderParts, named: Iterable[tuple[str, nn.Parameter]], seed: int,
                    shards: Mapping[str, Shard] | None = None) -> None:
    """Initialise every parameter from (seed, its global name) only.

    Values are drawn in float32 on the CPU and then cast, so float32 and float64 runs start from the same
    numbers and the result does not depend on the device or on which rank owns the parameter. A sharded
    parameter (``shards``) draws the full tensor and keeps its piece, so every tensor-parallel size starts
    from the same weights (one full parameter at a time in memory).
    """
    with torch.no_grad():
        for name, param in named:
            shard = shards.get(name) if shards else None
            buf = torch.empty(param.shape if shard is None else shard.full_shape(param.shape),
                              dtype=torch.float32)
            parts.init_parameter(name, buf, param_generator(seed, name))
            param.copy_(buf if shard is None else shard.take(buf))


class PlainContext:
    """LayerContext of an unsliced, unpipelined forward (the reference): plain causal attention, or with
    ``documents`` (s,) (one row's per-token document indices) a dense document-causal mask (token i sees
    the keys of its own document up to i) and, with ``restart_positions``, positions counted per document."""

    __slots__ = ("start", "positions", "shared", "recompute", "_mask")

    def __init__(self, documents: torch.Tensor | None = None, *, restart_positions: bool = True) -> None:
        self.start = 0
        self.shared: dict[str, object] = {}
        self.recompute = "none"
        self.positions = self._mask = None
        if documents is not None:
            s = documents.numel()
            same = documents[:, None] == documents[None, :]
            self._mask = same & torch.ones(s, s, dtype=torch.bool, device=documents.device).tril()
            if restart_positions:
                idx = torch.arange(s, device=documents.device)
                opens = torch.ones_like(same[0])
                opens[1:] = documents[1:] != documents[:-1]
                first = torch.cummax(torch.where(opens, idx, 0), dim=0).values  # its document's start
                self.positions = (idx - first).double()

    def checkpoint(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        return fn(*args)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self._mask is None,
            attn_mask=self._mask, enable_gqa=q.size(2) != k.size(2),
        )  # (b, H, t, d)
        return out.transpose(1, 2)
