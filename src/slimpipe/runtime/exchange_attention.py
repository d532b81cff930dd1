"""The owner's exchanged attention node: key blocks computed on a partner rank, merged exactly.

An owner hands the key block [0, tokens) of a slice's window to a helper rank, forward and backward, and
keeps the rest; block_attention's log-sum-exp merge and per-block backward make the gradients exact
(SlimPipe reference §8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from slimpipe.runtime.block_attention import (
    block_backward, block_forward, causal_mask, group_queries, merge, ungroup,
)

__all__ = ["OwnerJob", "ExchangedAttention", "ServeBackward", "Peer", "Pending"]


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


class OwnerJob:
    """What the owner's attention node needs: its query rows, the moved key counts and the peers."""

    __slots__ = ("start", "end", "fwd_tokens", "bwd_tokens", "fwd_peer", "bwd_peer", "table")

    def __init__(self, *, start: int, end: int, fwd_tokens: int, bwd_tokens: int, fwd_peer: Peer | None,
                 bwd_peer: Peer | None, table: Callable[[], torch.Tensor | None] | None = None) -> None:
        self.start, self.end = start, end  # the slice's query positions [start, end)
        self.fwd_tokens, self.bwd_tokens = fwd_tokens, bwd_tokens  # keys [0, tokens) computed remotely
        self.fwd_peer, self.bwd_peer = fwd_peer, bwd_peer
        self.table = table  # the rank's shared additive causal table rows [start, end) (CPU), or None

    def mask(self, key_start: int, groups: int, like: torch.Tensor) -> torch.Tensor:
        rows = self.table() if self.table is not None and groups == 1 else None
        if rows is not None and rows.dtype == like.dtype:
            return rows[:, key_start:]  # a view: no per-call mask
        return causal_mask(self.start, self.end, key_start, groups, dtype=like.dtype, device=like.device)


class ExchangedAttention(torch.autograd.Function):
    """Owner side: q (b, t, H, d) over the window k/v (b, end, H_kv, d); keys [0, fwd_tokens) go to the
    forward partner, keys [0, bwd_tokens) to the backward partner; the rest is computed here."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,  # type: ignore[override]
                job: OwnerJob) -> torch.Tensor:
        hk = k_win.size(2)
        g = q.size(2) // hk
        qg = group_queries(q, hk)  # (b, H_kv, g·t, d)
        k, v = k_win.transpose(1, 2), v_win.transpose(1, 2)  # (b, H_kv, end, d)
        n = job.fwd_tokens
        pending = job.fwd_peer.forward(qg, k[:, :, :n], v[:, :, :n]) if n else None  # overlaps the local part
        out, lse = block_forward(qg, k[:, :, n:], v[:, :, n:], job.mask(n, g, q))
        if pending is not None:
            out, lse = merge(out, lse, *pending.wait())
        res = ungroup(out, q.size(2)).contiguous()  # (b, t, H, d)
        # Save the returned layout (the output projection saves this very storage), regroup in backward.
        ctx.save_for_backward(q, k_win, v_win, res, lse)
        ctx.job = job
        return res

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k_win, v_win, res, lse = ctx.saved_tensors
        job: OwnerJob = ctx.job
        hk = k_win.size(2)
        g = q.size(2) // hk
        qg, dog, out = group_queries(q, hk), group_queries(dout, hk), group_queries(res, hk)
        k, v = k_win.transpose(1, 2), v_win.transpose(1, 2)
        n = job.bwd_tokens
        pending = job.bwd_peer.backward(dog, qg, out, lse, k[:, :, :n], v[:, :, :n]) if n else None
        dq, dk_l, dv_l = block_backward(dog, qg, k[:, :, n:], v[:, :, n:], out, lse, job.mask(n, g, q))
        dk, dv = torch.empty_like(k), torch.empty_like(v)  # (b, H_kv, end, d)
        dk[:, :, n:], dv[:, :, n:] = dk_l, dv_l
        if pending is not None:
            dq_r, dk[:, :, :n], dv[:, :, :n] = pending.wait()
            dq = dq + dq_r
        return ungroup(dq, q.size(2)), dk.transpose(1, 2), dv.transpose(1, 2), None


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
