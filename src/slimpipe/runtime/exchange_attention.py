"""The exchange's partner protocols and the helper's backward trigger.

An owner hands the attention over the earliest K/V blocks of a slice to a helper rank, forward and
backward, and keeps the rest (slice_attention.SliceAttention with a ``Peer``); block_attention's
log-sum-exp merge and per-block backward make the gradients exact (SlimPipe reference §8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

__all__ = ["ServeBackward", "Peer", "Pending"]


class Pending(Protocol):
    def wait(self) -> tuple[torch.Tensor, ...]:
        """The partner's reply (blocks until it arrived)."""
        ...


class Peer(Protocol):
    """The owner's view of its partner: start a remote block, get its result later."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Pending:
        """Remote block_forward(q, k, v, no mask) -> (out, lse)."""
        ...

    def backward(self, dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> Pending:
        """Remote block_backward(dout, q, k, v, out, lse, no mask) -> (dq share, dk, dv)."""
        ...


class ServeBackward(torch.autograd.Function):
    """Helper side of a backward exchange: identity on the attention output whose backward first serves
    the owner's request for this layer, so the helper works on it inside its own B, after this layer's
    MLP backward and before its own attention backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, serve: Callable[[], None]) -> torch.Tensor:  # type: ignore[override]
        ctx.serve = serve
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.serve()
        return grad, None
