"""Context parallelism at run time: the zig-zag token layout per slice and one rank's CP attention.

Layout (SlimPipe reference §3, §11). Slice j = global tokens [S, E) of T = E − S tokens is cut into 2c
pieces of P = T/(2c); CP rank r holds pieces r and 2c−1−r, in that order (:class:`ZigZag`), so every CP
rank has the same causal work inside every slice. A rank then runs the c = 1 runtime over its s/c local
tokens: local slice j is rows [S/c, E/c) of them, its K/V block per layer has 2P rows (1/c of the K/V
memory of c = 1), its pipeline messages carry its 2P tokens of the slice, its embedding and loss see its own ids and labels, RoPE its
tokens' *global* positions (``LayerContext.positions``). The per-slice loss is divided by the global token
count as for c = 1, so the sum over CP ranks (and DP replicas) is the c = 1 loss; gradients of the
parameters, which every CP rank holds whole, are summed over the dp·cp group.

Attention is the one place the CP ranks meet inside a layer: :class:`ContextParallel` runs query-out
attention (runtime/cp_attention.py) for every slice over the rank's per-slice K/V blocks, with any partner
the attention context exchange (runtime/exchange.py) named on the slice's window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimpipe.config import ConfigError
from slimpipe.runtime.cp_attention import CPGroup, SliceGeometry, cp_attention
from slimpipe.runtime.slice_attention import Window

__all__ = ["ZigZag", "ContextParallel"]


@dataclass(frozen=True, slots=True)
class ZigZag:
    """Which tokens of every slice CP rank ``rank`` of ``size`` holds."""

    size: int
    """c: context-parallel size."""
    rank: int
    """r: this rank's CP index in [0, c)."""
    bounds: tuple[int, ...]
    """Global slice boundaries [0, b1, …, s]: slice j is tokens [bounds[j], bounds[j+1])."""

    def __post_init__(self) -> None:
        two_c = 2 * self.size
        bad = [j for j in range(len(self.bounds) - 1) if (self.bounds[j + 1] - self.bounds[j]) % two_c]
        if bad:
            j = bad[0]
            raise ConfigError(
                f"slice {j} has {self.bounds[j + 1] - self.bounds[j]} tokens, not a multiple of "
                f"2c = {two_c}: context parallelism cuts every slice into 2c zig-zag pieces; use equal "
                "slices and a sequence length that is a multiple of 2·c·n"
            )

    def local_bounds(self) -> list[int]:
        """Boundaries of the slices in this rank's local token order (every slice holds T/c tokens)."""
        return [b // self.size for b in self.bounds]

    def piece(self, j: int) -> int:
        """P: tokens per piece of slice j."""
        return (self.bounds[j + 1] - self.bounds[j]) // (2 * self.size)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global positions (s/c,) of this rank's tokens in local order (pieces r, 2c−1−r of each slice)."""
        c, r, parts = self.size, self.rank, []
        for j in range(len(self.bounds) - 1):
            start, p = self.bounds[j], self.piece(j)
            for k in (r, 2 * c - 1 - r):
                parts.append(torch.arange(start + k * p, start + (k + 1) * p, device=device))
        return torch.cat(parts)

    def take(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (m, s+1) -> this rank's (ids, labels), each (m, s/c) in local order."""
        pos = self.positions(tokens.device)
        return tokens[:, pos], tokens[:, pos + 1]


class ContextParallel:
    """One rank's context parallelism: its CP group and, per step, the zig-zag layout of the slices."""

    def __init__(self, comm: CPGroup) -> None:
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank
        self.layout: ZigZag | None = None
        self.positions: torch.Tensor | None = None  # (s/c,) global positions of the local tokens

    def begin_step(self, bounds: list[int], device: torch.device) -> list[int]:
        """Set the step's layout from the global slice bounds; the local bounds the runtime works in."""
        self.layout = ZigZag(self.size, self.rank, tuple(bounds))  # raises unless every slice splits in 2c
        self.positions = self.layout.positions(device)
        self.comm.reset()
        return self.layout.local_bounds()

    def take(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (m, s+1) -> this rank's (ids, labels), each (m, s/c)."""
        assert self.positions is not None, "begin_step first"
        return tokens[:, self.positions], tokens[:, self.positions + 1]

    def global_start(self, j: int) -> int:
        """Global position of slice j's first token."""
        assert self.layout is not None
        return self.layout.bounds[j]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window) -> torch.Tensor:
        """Query-out attention of one slice: q (b, 2P, H, d), its K/V block k/v (b, 2P, H_kv, d) and the
        window of this rank's earlier blocks (with any exchange partner named on it) -> (b, 2P, H, d)."""
        geo = SliceGeometry(piece=q.size(1) // 2, rank=self.rank, size=self.size)
        return cp_attention(q, k, v, window, geo, self.comm)
