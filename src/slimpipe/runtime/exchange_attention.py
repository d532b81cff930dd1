"""Attention over key blocks with log-sum-exp, exact merging, and the owner's exchanged attention node.

The attention of a slice over its K/V window splits by keys: softmax over the union of two key sets is the
log-sum-exp merge of the two partial results, ``lse = logaddexp(lse_a, lse_b)``,
``out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse)``. The backward splits the same way: flash-style
backward of one key block, given the MERGED out and lse, returns that block's exact dk, dv and its share of
dq (``P = exp(S − lse)``, ``dS = P ∘ (dP − rowsum(dout ∘ out))``); the shares of dq add up. So an owner can
hand any key block to a helper, forward and backward, with exact gradients (SlimPipe reference §8).

Layout: grouped-query attention without expanding K/V. Queries ``(b, t, H, d)`` become
``(b, H_kv, g·t, d)`` (g = H/H_kv; query head h uses K/V head h // g, like SDPA's ``enable_gqa``), so every
block is plain multi-head attention against ``(b, H_kv, L, d)`` keys; the causal mask's rows repeat g times.
On CPU the blocks run in ATen's flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward, which return and take lse); elsewhere an explicit fp32 (fp64 for fp64) fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

__all__ = [
    "group_queries", "ungroup", "causal_mask", "block_forward", "block_backward", "merge", "lse_dtype",
    "math_block_forward", "math_block_backward",
    "OwnerJob", "ExchangedAttention", "ServeBackward", "Peer", "Pending",
]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exp for a given q dtype: fp32 for 16-bit inputs (as flash kernels return it)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def group_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, t, H, d) -> (b, H_kv, g·t, d): the g query heads sharing one K/V head become one longer block."""
    b, t, h, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, kv_heads, (h // kv_heads) * t, d)


def ungroup(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, H_kv, g·t, d) -> (b, t, H, d), the inverse of group_queries."""
    b, hk, gt, d = x.shape
    return x.reshape(b, heads, gt // (heads // hk), d).permute(0, 2, 1, 3)


def causal_mask(start: int, end: int, key_start: int, groups: int, *, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Additive mask (g·(end − start), end − key_start): query at position q sees keys at positions ≤ q."""
    q_pos = torch.arange(start, end, device=device)
    k_pos = torch.arange(key_start, end, device=device)
    mask = torch.zeros(end - start, end - key_start, dtype=dtype, device=device)
    mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return mask.repeat(groups, 1) if groups > 1 else mask


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                  causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, h, tq, d), k/v (b, h, tk, d) -> out (b, h, tq, d), lse (b, h, tq) (lse_dtype).

    ``causal``: a square causal block (tq == tk, ungrouped queries), no mask needed. On CPU k/v may also
    have fewer heads than q (h_kv dividing h: the flash kernel's native GQA, query head i uses i // g)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                              attn_mask=mask)
        return out, lse
    return math_block_forward(q, k, v, _square_causal(q, k) if causal else mask)


def _square_causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The additive (tk, tk) mask of a square causal block for the math fallback."""
    tk = k.size(-2)
    return causal_mask(0, tk, 0, 1, dtype=q.dtype, device=q.device)


def math_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """block_forward in explicit fp32 (fp64 for fp64) matmuls: the non-CPU fallback."""
    md = _math_dtype(q.dtype)
    s = (q.to(md) @ k.to(md).transpose(-1, -2)) * q.size(-1) ** -0.5  # (b, h, tq, tk)
    if mask is not None:
        s = s + mask.to(md)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]) @ v.to(md)
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: torch.Tensor | None, *,
                   causal: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients of one key block given the merged out/lse: (dq share, dk, dv), shapes of q, k, v."""
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask)
        return dq, dk, dv
    return math_block_backward(dout, q, k, v, out, lse, _square_causal(q, k) if causal else mask)


def math_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """block_backward in explicit matmuls: the non-CPU fallback."""
    md = _math_dtype(q.dtype)
    qm, km, vm, dom = q.to(md), k.to(md), v.to(md), dout.to(md)
    scale = q.size(-1) ** -0.5
    s = (qm @ km.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(md)
    prob = torch.exp(s - lse.to(md)[..., None])  # (b, h, tq, tk)
    dv = prob.transpose(-1, -2) @ dom
    dprob = dom @ vm.transpose(-1, -2)
    ds = prob * (dprob - (dom * out.to(md)).sum(-1, keepdim=True))
    dq, dk = (ds @ km) * scale, (ds.transpose(-1, -2) @ qm) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
          into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from the two partial results.

    ``into``: where to write the merged out (same shape as out_a, any strides — e.g. a transposed view
    of the layout the caller wants); a new tensor by default. 16-bit outputs merge in the lse dtype and
    round once."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    out = torch.empty_like(out_a) if into is None else into
    if out_a.dtype == lse.dtype:
        torch.mul(out_a, wa, out=out)
        out.addcmul_(out_b, wb)
    else:
        out.copy_(out_a.to(lse.dtype) * wa + out_b.to(lse.dtype) * wb)
    return out, lse


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
