"""Per-slice K/V blocks of one sequence with the dK/dV hand-down, as the runtime's K/V store keeps them
(runtime/kv.py), for attention tests that run slice by slice outside the runtime."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimpipe.runtime.slice_attention import Window

__all__ = ["Blocks", "run_slices"]


class Blocks:
    """Blocks 0 … j−1 (detached, read in place) and an accumulator per block that a later slice handed
    dK/dV to; ``deposited`` records which blocks ever got one."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.acc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.deposited: set[int] = set()

    def window(self, j: int, **partners: object) -> Window:
        """Slice j's window; ``partners``: the exchange's fwd_peer/fwd_volume/bwd_peer/bwd_volume."""
        return Window(prefix_k=list(self.k[:j]), prefix_v=list(self.v[:j]),
                      handed=lambda: self.acc.pop(j, (None, None)), deposit=self.deposit, **partners)

    def deposit(self, i: int, dk: torch.Tensor, dv: torch.Tensor, row: int = 0) -> None:
        if i not in self.acc:
            self.acc[i] = (torch.zeros_like(self.k[i]), torch.zeros_like(self.v[i]))
        self.deposited.add(i)
        self.acc[i][0][:, row : row + dk.size(1)] += dk
        self.acc[i][1][:, row : row + dv.size(1)] += dv

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(k.detach())
        self.v.append(v.detach())


def run_slices(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bounds: list[int] | tuple[int, ...], dout: torch.Tensor,
               partners: Callable[[int], dict] | None = None) -> tuple[torch.Tensor, Blocks]:
    """Slices in order, ``attend(j, q_j, k_j, v_j, window)`` each (rows [bounds[j], bounds[j+1]) of q, k, v
    (b, s, heads, d) leaves), then their backwards in reverse order with ``dout``; the concatenated output
    and the blocks (every hand-down must have been consumed)."""
    blocks, outs = Blocks(), []
    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        win = blocks.window(j, **(partners(j) if partners else {}))
        outs.append(attend(j, q[:, a:b], k[:, a:b], v[:, a:b], win))
        blocks.add(k[:, a:b], v[:, a:b])
    for j in reversed(range(len(bounds) - 1)):
        outs[j].backward(dout[:, bounds[j] : bounds[j + 1]])
    assert not blocks.acc, "a hand-down was never consumed"
    return torch.cat([o.detach() for o in outs], dim=1), blocks
