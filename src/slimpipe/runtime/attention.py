"""Causal attention of a slice over a contiguous K/V window, and the per-rank kernel choice (MaskCache).

The runtime's slices attend block by block (slice_attention.py: the K/V store keeps one block per slice);
this module holds the kernels over one contiguous window ``k_win/v_win (b, end, H_kv, d)`` that the
legacy kernel modes, the benchmarks and the tests use. Slice j (tokens [start, end)) attends to keys
[0, end): earlier slices unmasked, its own block causal and lower-right aligned (query i sees keys up to
start + i).

Kernels (``MaskCache.mode``). ``auto``/``blocks``: slice 0 is plain square-causal SDPA; a later slice
(``WindowBlocks``) runs two fused calls, the prefix block (keys [0, start), UNMASKED) and its own diagonal
block (keys [start, end), square causal, ``is_causal=True``), merged by log-sum-exp, and its backward runs
the fused backward of each block with the merged out/lse (runtime/block_attention.py; exact, see there).
The causal kernel skips the masked half of the diagonal block and nothing reads a mask, so slicing costs
what the unsliced causal attention costs. CPU: ATen's flash kernel (every dtype, native GQA). CUDA: the
FA2 op (fp16/bf16, head_dim ≤ 256 and a multiple of 8, GQA native); anything else falls back to ``bias``.
Legacy single-call modes, kept as reference and for comparison: ``table`` (a view ``M[start:end, :end]``
of one additive causal table shared by all slices and layers) and ``bias`` (``causal_lower_right``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.runtime.block_attention import block_backward, block_forward, merge

__all__ = ["MaskCache", "WindowBlocks", "window_attention", "recompute_backward",
           "MASK_MODES", "cuda_flash_fits"]

MASK_MODES = ("auto", "blocks", "table", "bias")

log = logging.getLogger(__name__)


class MaskCache:
    """Per-rank choice of slice-attention kernel, and the causal table of the ``table`` mode."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode {mode!r} is unknown: use one of {MASK_MODES}")
        self.mode = mode
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.ptrs: set[int] = set()  # storages of the cached tables (constants, excluded from accounting)
        self.cuda_blocks = True  # cleared when the CUDA fused op fails once (then ``bias`` is used)
        self.force_math = False  # slice_attention: explicit matmuls on every device (tests the CUDA fallback)

    def uses_blocks(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether window_attention takes the two-block path for q (b, t, H, d), k (b, end, H_kv, d)."""
        if self.mode not in ("auto", "blocks"):
            return False
        if q.device.type == "cpu":
            return True
        return q.device.type == "cuda" and self.cuda_blocks and cuda_flash_fits(q, k)

    def uses_table(self, device: torch.device) -> bool:
        """Whether mask() returns rows of the additive table on this device (the exchange owner's local
        block still uses them on CPU; window_attention uses them only in ``table`` mode)."""
        return self.mode == "table" or (self.mode in ("auto", "blocks") and device.type == "cpu")

    def mask(self, start: int, end: int, *, device: torch.device, dtype: torch.dtype, seq_len: int) -> object:
        if not self.uses_table(device):
            return causal_lower_right(end - start, end)
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table.size(0) < seq_len:
            keep = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            table = torch.zeros(seq_len, seq_len, dtype=dtype, device=device)
            table.masked_fill_(~keep, float("-inf"))  # additive: 0 where visible
            self._tables[key] = table
            self.ptrs = {t.untyped_storage().data_ptr() for t in self._tables.values()}
        return table[start:end, :end]


def cuda_flash_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the CUDA FA2 op takes q (b, ·, H, d) and k (b, ·, H_kv, d): fp16/bf16, d ≤ 256, d % 8 == 0."""
    d = q.size(-1)
    return (q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and q.size(2) % k.size(2) == 0)


def _kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """One fused block: q (b, H, tq, d), k/v (b, H_kv, tk, d) -> out (b, H, tq, d), lse (b, H, tq), state."""
    if q.device.type != "cuda":
        out, lse = block_forward(q, k, v, None, causal=causal)
        return out, lse, ()
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    # FA2 (native GQA); cum_q/cum_k are None outside varlen, seed/offset unused without dropout.
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = flash(q, k, v, 0.0, causal, False)
    return out, lse[..., : q.size(2)], (cum_q, cum_k, max_q, max_k, seed, offset)


def _kernel_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, causal: bool, state: tuple) -> tuple[torch.Tensor, ...]:
    """Block gradients (dq share, dk, dv) given the MERGED out/lse (exchange_attention's rule)."""
    if q.device.type != "cuda":
        return block_backward(dout, q, k, v, out, lse, None, causal=causal)
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset)


def _merge(out_p: torch.Tensor, lse_p: torch.Tensor, out_d: torch.Tensor,
           lse_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two key blocks into a (b, t, H, d)-contiguous out and lse (b, H, t).

    The out layout matters: the model's ``view(b, t, H·d)`` of it is then free, so the output projection
    saves the very storage this node saves (as with plain SDPA) instead of a second copy."""
    b, h, t, d = out_p.shape
    out = out_p.new_empty(b, t, h, d)
    _, lse = merge(out_p, lse_p, out_d, lse_d, into=out.transpose(1, 2))  # written through the view
    return out, lse


class WindowBlocks(torch.autograd.Function):
    """q (b, t, H, d) of tokens [start, end) over k_win/v_win (b, end, H_kv, d), start > 0 -> (b, t, H, d):
    prefix block unmasked + diagonal block square-causal, merged by log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,  # type: ignore[override]
                start: int) -> torch.Tensor:
        qt, kt, vt = q.transpose(1, 2), k_win.transpose(1, 2), v_win.transpose(1, 2)  # (b, heads, len, d)
        out_p, lse_p, st_p = _kernel_forward(qt, kt[:, :, :start], vt[:, :, :start], False)
        out_d, lse_d, st_d = _kernel_forward(qt, kt[:, :, start:], vt[:, :, start:], True)
        out, lse = _merge(out_p, lse_p, out_d, lse_d)  # (b, t, H, d), (b, H, t)
        # kt/vt: views of the caller's K/V window (saved as they are, never copied here).
        ctx.save_for_backward(qt, kt, vt, out, lse)
        ctx.start, ctx.states = start, (st_p, st_d)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        qt, kt, vt, out, lse = ctx.saved_tensors
        try:
            return WindowBlocks._blocks_backward(ctx, dout, qt, kt, vt, out, lse)
        except RuntimeError as exc:  # the FA2 backward refused: recompute through SDPA, still exact
            if qt.device.type != "cuda":
                raise
            log.warning("fused two-block backward failed (%s); recomputing with causal_lower_right", exc)
            return (*recompute_backward(dout, qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2),
                                        ctx.start), None)

    @staticmethod
    def _blocks_backward(ctx, dout: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor) -> tuple:
        start, (st_p, st_d) = ctx.start, ctx.states
        dot, ot = dout.transpose(1, 2), out.transpose(1, 2)  # (b, H, t, d)
        dq, dk_p, dv_p = _kernel_backward(dot, qt, kt[:, :, :start], vt[:, :, :start], ot, lse, False, st_p)
        dq_d, dk_d, dv_d = _kernel_backward(dot, qt, kt[:, :, start:], vt[:, :, start:], ot, lse, True, st_d)
        dq = dq + dq_d
        b, hk, end, d = kt.shape
        dk, dv = kt.new_empty(b, end, hk, d), vt.new_empty(b, end, hk, d)  # the window's (b, end, H_kv, d)
        for grad, pre, own in ((dk, dk_p, dk_d), (dv, dv_p, dv_d)):
            grad[:, :start].copy_(pre.transpose(1, 2))
            grad[:, start:].copy_(own.transpose(1, 2))
        return dq.transpose(1, 2), dk, dv, None


def recompute_backward(dout: torch.Tensor, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                       start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk_win, dv_win) of a slice by re-running one SDPA with ``causal_lower_right`` (the safety net
    of WindowBlocks' CUDA backward). q (b, t, H, d), k_win/v_win (b, end, H_kv, d), dout (b, t, H, d)."""
    leaves = [x.detach().requires_grad_() for x in (q, k_win, v_win)]
    qt, kt, vt = (x.transpose(1, 2) for x in leaves)  # (b, heads, len, d)
    with torch.enable_grad():
        out = scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(q.size(1), k_win.size(1)),
                                           enable_gqa=q.size(2) != k_win.size(2))
        dq, dk, dv = torch.autograd.grad(out.transpose(1, 2), leaves, dout)
    return dq, dk, dv


def window_attention(q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, start: int,
                     masks: MaskCache, seq_len: int) -> torch.Tensor:
    """q (b, t, H, d) of tokens [start, start+t); k_win/v_win (b, start+t, H_kv, d); returns (b, t, H, d)."""
    if start and masks.uses_blocks(q, k_win):
        try:
            return WindowBlocks.apply(q, k_win, v_win, start)
        except RuntimeError as exc:  # an op this torch/GPU lacks: the single-call bias path still works
            if q.device.type != "cuda":
                raise
            masks.cuda_blocks = False
            log.warning("fused two-block slice attention unavailable (%s); using causal_lower_right", exc)
    end = k_win.size(1)
    gqa = q.size(2) != k_win.size(2)
    qt, kt, vt = q.transpose(1, 2), k_win.transpose(1, 2), v_win.transpose(1, 2)  # (b, heads, len, d)
    if start == 0:  # square block: upper-left and lower-right alignment coincide
        out = scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        mask = masks.mask(start, end, device=q.device, dtype=q.dtype, seq_len=seq_len)  # table or bias
        out = scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)  # type: ignore
    return out.transpose(1, 2)
