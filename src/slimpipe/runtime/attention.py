"""Slice-aware causal attention over a K/V window, without copying the prefix.

Slice j of a sequence (tokens [start, end)) attends to the K/V of tokens [0, end): earlier slices unmasked,
its own block causal and lower-right aligned (query i sees keys up to start + i). The K/V of one
(stage, micro-batch, layer) live in one buffer ``(b, s, H_kv, d)``; slice j writes its own K/V into rows
[start, end) and attends to the view ``buf[:, :end]``. Nothing is concatenated, so the tensors SDPA saves
for backward are views of that buffer: K/V are stored once per sequence, not once per slice
(``torch.cat`` of the prefix would save (j+1)/n of the sequence's K/V for every slice j).

``KVWindow`` is the autograd node joining the slice's own K/V to the window. Its backward splits the
window gradient: rows [0, start) go to the prefix leaf (a detached alias of the buffer with
requires_grad, whose .grad the K/V store hands down to the earlier slices), rows [start, end) go to the
slice's own K/V plus the dK/dV that later slices already handed down. That is exactly
``autograd.backward([out_j, k_j, v_j], [dout_j, dK_j, dV_j])`` except that k_j need not be kept alive.

Masks: on CUDA ``causal_lower_right`` (SDPA dispatches it to flash/efficient kernels, no dense mask). On
CPU that bias is materialised per call and saved for backward (t × end floats per slice and layer), so
instead every slice uses a view of one additive causal table ``M[start:end, :end]`` shared by all slices
and layers (the mask is then one constant, not per-slice activation memory). Both are the same mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

__all__ = ["KVWindow", "MaskCache", "window_attention", "MASK_MODES"]

MASK_MODES = ("auto", "table", "bias")


class KVWindow(torch.autograd.Function):
    """own (b, t, H_kv, d) written into buf[:, start:end]; returns the view buf[:, :end] (b, end, H_kv, d)."""

    @staticmethod
    def forward(ctx, own: torch.Tensor, prefix: torch.Tensor | None, buf: torch.Tensor, start: int,
                handed: Callable[[], torch.Tensor | None]) -> torch.Tensor:  # type: ignore[override]
        end = start + own.size(1)
        # Write through .data: it has its own version counter, so filling rows [start, end) does not bump
        # the version of the views earlier slices saved (rows they read are never written again).
        buf.data[:, start:end].copy_(own)
        ctx.start, ctx.handed = start, handed
        return buf[:, :end]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        start = ctx.start
        own = grad[:, start:]
        extra = ctx.handed()  # dK/dV of rows [start, end) from later slices, or None (last slice)
        if extra is not None:
            own = own + extra
        return own, (grad[:, :start] if start else None), None, None, None


class MaskCache:
    """Per-rank source of causal masks for slice attention (see the module docstring)."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode {mode!r} is unknown: use one of {MASK_MODES}")
        self.mode = mode
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.ptrs: set[int] = set()  # storages of the cached tables (constants, excluded from accounting)

    def uses_table(self, device: torch.device) -> bool:
        return self.mode == "table" or (self.mode == "auto" and device.type == "cpu")

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


def window_attention(q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, start: int,
                     masks: MaskCache, seq_len: int) -> torch.Tensor:
    """q (b, t, H, d) of tokens [start, start+t); k_win/v_win (b, start+t, H_kv, d); returns (b, t, H, d)."""
    end = k_win.size(1)
    gqa = q.size(2) != k_win.size(2)
    qt, kt, vt = q.transpose(1, 2), k_win.transpose(1, 2), v_win.transpose(1, 2)  # (b, heads, len, d)
    if start == 0:  # square block: upper-left and lower-right alignment coincide
        out = scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        mask = masks.mask(start, end, device=q.device, dtype=q.dtype, seq_len=seq_len)
        out = scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)  # type: ignore
    return out.transpose(1, 2)
