"""Slice attention over per-slice K/V blocks: no whole-sequence buffer, no copied prefix, exact hand-down.

Slice j's queries (tokens [start, end)) attend to the K/V blocks of slices 0 … j−1 unmasked and to their
own block square-causally (lower-right alignment is automatic: the own block is square). Each block is one
fused kernel call; the partial results merge by log-sum-exp (block_forward / merge: exact). The blocks are
the K/V store's tensors (kv.py), read in place, so what the attention saves for backward is the slice's q,
out and lse plus its own K/V block (which is the store's block j: counted once, as K/V).

Backward, per block, given the merged out and lse (exact, see exchange_attention): dq shares add up; the
own block's dK/dV flow back into the slice's K/V projections together with what later slices handed down
(``Window.handed``); every prefix block's dK/dV is handed down (``Window.deposit``) to the store, which
adds it into block i's accumulator for slice i's backward. That is TeraPipe's
``autograd.backward([out_j, k_j, v_j], [dout_j, dK_j, dV_j])``, block by block.

The attention context exchange plugs in here: a window may name a partner computing the attention of its
earliest ``volume`` blocks (one message: q and those blocks concatenated), in the forward and/or the
backward (exchange.py). Kernels: CPU ATen's flash kernel with native GQA; CUDA the FA2 op for fp16/bf16
(head_dim ≤ 256, multiple of 8), otherwise explicit matmuls over grouped queries (``math``), exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimpipe.runtime.attention import MaskCache, cuda_flash_fits
from slimpipe.runtime.block_attention import (
    block_backward, block_forward, causal_mask, group_queries, lse_dtype, math_block_backward, math_block_forward,
)
from slimpipe.runtime.exchange_attention import Peer

__all__ = ["Window", "SliceAttention", "slice_attention", "cat_blocks"]


@dataclass(slots=True)
class Window:
    """What one slice attends to (besides its own K/V) and where the prefix gradients go."""

    prefix_k: list[torch.Tensor]
    """Keys of slices 0 … j−1, each (b, t_i, H_kv, d): the store's blocks, read in place."""
    prefix_v: list[torch.Tensor]
    """Values of slices 0 … j−1."""
    handed: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]
    """dK, dV of this slice's own block handed down by later slices (read in the backward)."""
    deposit: Callable[..., None]
    """deposit(i, dK, dV, row=0): this slice's gradient for rows [row, row + len) of prefix block i, each
    (b, len, H_kv, d) (added into the store's accumulator for block i)."""
    fwd_peer: Peer | None = None
    """Partner computing the forward attention over the earliest ``fwd_volume`` blocks (exchange)."""
    fwd_volume: int = 0
    bwd_peer: Peer | None = None
    """Partner computing the backward over the earliest ``bwd_volume`` blocks (exchange)."""
    bwd_volume: int = 0

    def volume(self, backward: bool) -> int:
        """How many of the earliest blocks a partner computes in this direction (0 without a partner)."""
        if backward:
            return self.bwd_volume if self.bwd_peer is not None else 0
        return self.fwd_volume if self.fwd_peer is not None else 0

    def deposit_joined(self, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """A partner's dK/dV (b, H_kv, rows of blocks 0 … vol−1, d), handed down block by block."""
        lo = 0
        for i in range(len(self.prefix_k)):
            if lo == dk.size(2):
                break
            hi = lo + self.prefix_k[i].size(1)
            self.deposit(i, dk[:, :, lo:hi].transpose(1, 2), dv[:, :, lo:hi].transpose(1, 2))
            lo = hi

    def with_handed(self, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The own block's dK/dV (b, t, H_kv, d) plus what later slices handed down to it (consumed)."""
        hk, hv = self.handed()
        return (dk if hk is None else dk + hk), (dv if hv is None else dv + hv)


def _md(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Kernels:
    """One backend for every local block of one call: ``native`` (CPU flash / CUDA FA2, GQA native) or
    ``math`` (explicit matmuls over grouped queries, any device)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, masks: MaskCache | None) -> None:
        self.cpu = q.device.type == "cpu" and not (masks is not None and masks.force_math)
        self.flash = (not self.cpu and q.device.type == "cuda" and masks is not None and masks.cuda_blocks
                      and not masks.force_math and cuda_flash_fits(q, k))
        self.heads, self.kv_heads = q.size(2), k.size(2)

    def forward(self, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool) -> tuple:
        """qt (b, H, t, d), kt/vt (b, H_kv, L, d) -> out (b, H, t, d), lse (b, H, t), backward state."""
        if self.cpu:
            out, lse = block_forward(qt, kt, vt, None, causal=causal)
            return out, lse, ()
        if self.flash:
            flash = torch.ops.aten._scaled_dot_product_flash_attention
            out, lse, cq, ck, mq, mk, seed, off, _ = flash(qt, kt, vt, 0.0, causal, False)
            return out, lse[..., : qt.size(2)], (cq, ck, mq, mk, seed, off)
        qg = self._group(qt)
        out, lse = math_block_forward(qg, kt, vt, self._mask(qt, causal))
        b, h, t, d = qt.shape
        return out.reshape(b, h, t, d), lse.reshape(b, h, t), ()

    def backward(self, dot: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, ot: torch.Tensor,
                 lse: torch.Tensor, causal: bool, state: tuple | None) -> tuple[torch.Tensor, ...]:
        """(dq share (b, H, t, d), dk, dv (b, H_kv, L, d)) given the merged out/lse."""
        if self.cpu:
            return block_backward(dot, qt, kt, vt, ot, lse, None, causal=causal)
        if self.flash and state:
            cq, ck, mq, mk, seed, off = state
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dot, qt, kt, vt, ot, lse, cq, ck, mq, mk, 0.0, causal, seed, off)
        b, h, t, d = qt.shape
        dq, dk, dv = math_block_backward(self._group(dot), self._group(qt), kt, vt, self._group(ot),
                                         lse.reshape(b, self.kv_heads, -1), self._mask(qt, causal))
        return dq.reshape(b, h, t, d), dk, dv

    def _group(self, x: torch.Tensor) -> torch.Tensor:  # (b, H, t, d) -> (b, H_kv, g·t, d)
        b, h, t, d = x.shape
        return x.reshape(b, self.kv_heads, (h // self.kv_heads) * t, d)

    def _mask(self, qt: torch.Tensor, causal: bool) -> torch.Tensor | None:
        if not causal:
            return None
        t = qt.size(2)
        return causal_mask(0, t, 0, self.heads // self.kv_heads, dtype=qt.dtype, device=qt.device)


def _merge_into(acc: list[torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor) -> list[torch.Tensor]:
    """Running log-sum-exp merge in the lse dtype: [out (b, H, t, d), lse (b, H, t)]."""
    md = lse.dtype
    if acc is None:
        return [out.to(md), lse]
    new = torch.logaddexp(acc[1], lse)
    acc[0].mul_(torch.exp(acc[1] - new)[..., None]).add_(out.to(md) * torch.exp(lse - new)[..., None])
    acc[1] = new
    return acc


def cat_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks (b, t_i, H_kv, d) -> (b, H_kv, Σt_i, d) contiguous: the message for a partner."""
    return torch.cat(blocks, dim=1).transpose(1, 2).contiguous()


class SliceAttention(torch.autograd.Function):
    """q (b, t, H, d), own k/v (b, t, H_kv, d), a Window of earlier blocks -> (b, t, H, d)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window,  # type: ignore[override]
                masks: MaskCache | None) -> torch.Tensor:
        kern = _Kernels(q, k, masks)
        qt = q.transpose(1, 2)  # (b, H, t, d)
        vol = window.volume(backward=False)
        pending = None
        if vol:  # post the partner's share first: it overlaps the local blocks
            hk = k.size(2)
            pending = window.fwd_peer.forward(  # type: ignore[union-attr]
                group_queries(q, hk), cat_blocks(window.prefix_k[:vol]), cat_blocks(window.prefix_v[:vol]))
        blocks = [(kb, vb, False) for kb, vb in zip(window.prefix_k[vol:], window.prefix_v[vol:])]
        blocks.append((k, v, True))
        acc, states = None, {}
        for i, (kb, vb, causal) in enumerate(blocks, start=vol):
            o, lse, st = kern.forward(qt, kb.transpose(1, 2), vb.transpose(1, 2), causal)
            states[i] = st
            acc = _merge_into(acc, o, lse)
        assert acc is not None
        if pending is not None:
            o_r, lse_r = pending.wait()  # grouped (b, H_kv, g·t, d), (b, H_kv, g·t)
            acc = _merge_into(acc, o_r.reshape(qt.shape), lse_r.reshape(acc[1].shape))
        if acc[0].dtype == q.dtype and acc[0].transpose(1, 2).is_contiguous():
            out = acc[0].transpose(1, 2)  # already the (b, t, H, d) layout (one CPU flash block): no copy
        else:
            b, h, t, d = qt.shape
            out = q.new_empty(b, t, h, d)  # (b, t, H, d): the model's view(b, t, H·d) of it is free
            out.transpose(1, 2).copy_(acc[0])
        lse = acc[1].to(lse_dtype(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.masks, ctx.states = window, masks, states
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        window: Window = ctx.window
        kern = _Kernels(q, k, ctx.masks)
        qt, dot, ot = q.transpose(1, 2), dout.transpose(1, 2), out.transpose(1, 2)
        j = len(window.prefix_k)
        vol = window.volume(backward=True)
        pending = None
        if vol:
            hk = k.size(2)
            pending = window.bwd_peer.backward(  # type: ignore[union-attr]
                group_queries(dout, hk), group_queries(q, hk), group_queries(out, hk),
                lse.reshape(lse.size(0), hk, -1), cat_blocks(window.prefix_k[:vol]),
                cat_blocks(window.prefix_v[:vol]))
        dq = torch.zeros(qt.shape, dtype=_md(q.dtype), device=q.device)
        dk = dv = None
        for i in range(vol, j + 1):
            kb, vb = (window.prefix_k[i], window.prefix_v[i]) if i < j else (k, v)
            d_q, d_k, d_v = kern.backward(dot, qt, kb.transpose(1, 2), vb.transpose(1, 2), ot, lse, i == j,
                                          ctx.states.get(i))
            dq += d_q
            if i < j:
                window.deposit(i, d_k.transpose(1, 2), d_v.transpose(1, 2))
            else:
                dk, dv = d_k.transpose(1, 2), d_v.transpose(1, 2)  # (b, t, H_kv, d)
        if pending is not None:
            dq_r, dk_r, dv_r = pending.wait()  # grouped dq share; dk/dv (b, H_kv, keys of [0, vol), d)
            dq += dq_r.reshape(qt.shape)
            window.deposit_joined(dk_r, dv_r)
        assert dk is not None and dv is not None
        return dq.to(q.dtype).transpose(1, 2), *window.with_handed(dk, dv), None, None


def slice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window,
                    masks: MaskCache | None = None) -> torch.Tensor:
    """q (b, t, H, d) of slice j, its k/v (b, t, H_kv, d), the window of blocks 0 … j−1 -> (b, t, H, d)."""
    return SliceAttention.apply(q, k, v, window, masks)  # type: ignore[no-any-return]
