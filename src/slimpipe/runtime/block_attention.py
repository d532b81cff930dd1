"""Attention over one block of keys, and the exact log-sum-exp merge of two blocks.

The attention of a slice over its K/V window splits by keys: softmax over the union of two key sets is the
log-sum-exp merge of the two partial results, ``lse = logaddexp(lse_a, lse_b)``,
``out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse)``. The backward splits the same way: flash-style
backward of one key block, given the MERGED out and lse, returns that block's exact dk, dv and its share of
dq (``P = exp(S − lse)``, ``dS = P ∘ (dP − rowsum(dout ∘ out))``); the shares of dq add up. The slice
attention (runtime/attention.py: prefix block + diagonal causal block) and the attention context exchange
(runtime/exchange_attention.py: a key block computed on a partner rank) both build on this.

Layout: grouped-query attention without expanding K/V. Queries ``(b, t, H, d)`` become
``(b, H_kv, g·t, d)`` (g = H/H_kv; query head h uses K/V head h // g, like SDPA's ``enable_gqa``), so every
block is plain multi-head attention against ``(b, H_kv, L, d)`` keys; the causal mask's rows repeat g times.
On CPU the blocks run in ATen's flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward, which return and take lse); elsewhere an explicit fp32 (fp64 for fp64) fallback.
"""

from __future__ import annotations

import torch

__all__ = [
    "group_queries", "ungroup", "causal_mask", "block_forward", "block_backward", "merge", "lse_dtype",
    "math_block_forward", "math_block_backward",
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
          into: torch.Tensor | None = None,
          lse_into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from the two partial results.

    ``into``: where to write the merged out (same shape as out_a, any strides — e.g. a transposed view
    of the layout the caller wants); a new tensor by default. ``lse_into``: the same for the merged lse
    (may be lse_a itself: context parallelism merges block results in place). 16-bit outputs merge in the
    lse dtype and round once."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    if lse_into is not None:
        lse = lse_into.copy_(lse)
    out = torch.empty_like(out_a) if into is None else into
    if out_a.dtype == lse.dtype:
        torch.mul(out_a, wa, out=out)
        out.addcmul_(out_b, wb)
    else:
        out.copy_(out_a.to(lse.dtype) * wa + out_b.to(lse.dtype) * wb)
    return out, lse
