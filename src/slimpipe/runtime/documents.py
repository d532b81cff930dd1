"""Packed documents in the runtime: document-causal slice attention, per-document positions, label masks.

A step's ``documents`` tensor (m, s+1) gives each token's document index, non-decreasing along a row (one
row per micro-batch). From it, per row: the document starts (``RowDocs``), each slice's spans
(slimpipe.sim.documents.slice_spans: the same function the simulator prices), the position of every token
in its document (RoPE restarts per document when asked), and the labels with −100 wherever the next token
opens another document (no loss across a boundary; the cross-entropies ignore −100).

Attention (``DocumentAttention``): slice j's queries run as per-document segments, never with a mask —
the carry-in document's rows [0, c) over the prefix keys [D, start) (one unmasked rectangle) merged by
log-sum-exp with their own keys (square causal), every other document [a, b) square causal over its own
keys. Keys before D, and prefix keys for rows of later documents, are never touched: no attention work on a
masked block. The prefix keys are the K/V store's per-slice blocks (runtime/kv.py), read in place: the carry
rectangle is one call per block that reaches past D (the first from row D − its start). Backward: the same
calls' exact per-block gradients given the merged out/lse (runtime/block_attention.py); dq shares add up,
each carry block's dK/dV rows are handed down to the store (``Window.deposit``); a block wholly before D
gets nothing, so its dK/dV accumulator is never created. Why segments and not one masked call:
docs/runtime.md "Packed documents" (measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimpipe.runtime.block_attention import (
    block_backward, block_forward, causal_mask, lse_dtype, math_block_backward, math_block_forward, merge,
)
from slimpipe.runtime.slice_attention import Window
from slimpipe.sim.documents import SliceSpans, slice_spans

__all__ = ["RowDocs", "StepDocs", "DocumentAttention", "document_attention", "forward_blocks",
           "backward_blocks", "IGNORE"]

IGNORE = -100
"""Label of a position that takes no loss (the cross-entropies' ignore index)."""


@dataclass(frozen=True, slots=True)
class RowDocs:
    """The documents of one packed row (input positions [0, s))."""

    starts: tuple[int, ...]
    """First position of every document, starts[0] = 0."""

    @staticmethod
    def of(ids: torch.Tensor) -> RowDocs:
        """From per-token document indices (s,) (non-decreasing)."""
        change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
        return RowDocs((0, *change.tolist()))

    def spans(self, start: int, end: int) -> SliceSpans:
        return slice_spans(self.starts, start, end)

    def positions(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        """(end − start,) position of each token in its document (float64, for RoPE angles)."""
        sp = self.spans(start, end)
        pos = torch.empty(end - start, dtype=torch.float64, device=device)
        first = start - sp.carry
        for a, b in sp.segments:
            pos[a:b] = torch.arange(first if a == 0 else 0, (first if a == 0 else 0) + b - a,
                                    dtype=torch.float64, device=device)
        return pos


@dataclass(frozen=True, slots=True)
class StepDocs:
    """Document structure of one step: per-row documents, masked labels, the positions mode."""

    rows: tuple[RowDocs, ...]
    """One per micro-batch row."""
    labels: torch.Tensor
    """(m, s) next-token labels, IGNORE where the next token opens another document."""
    restart_positions: bool
    """RoPE positions count from each document's start (else the row's positions)."""
    valid_labels: int
    """Labels that take a loss (the normaliser's share of this step's rows)."""

    @staticmethod
    def of(tokens: torch.Tensor, documents: torch.Tensor, *, restart_positions: bool = True) -> StepDocs:
        """tokens, documents (m, s+1) on one device."""
        if documents.shape != tokens.shape:
            raise ValueError(f"documents {tuple(documents.shape)} must have the tokens' shape {tuple(tokens.shape)}")
        if bool((documents[:, 1:] < documents[:, :-1]).any()):
            raise ValueError("document indices must not decrease along a row")
        boundary = documents[:, 1:] != documents[:, :-1]  # label i (token i+1) opens another document
        labels = tokens[:, 1:].masked_fill(boundary, IGNORE)
        rows = tuple(RowDocs.of(documents[r, :-1]) for r in range(documents.size(0)))
        return StepDocs(rows, labels, restart_positions, int((~boundary).sum()))


def _attend(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
            native: bool) -> tuple[torch.Tensor, ...]:
    """One block: qt (b, H, tq, d), kt/vt (b, H_kv, tk, d) -> out (b, H, tq, d), lse (b, H, tq).
    ``native``: the CPU flash kernel (GQA native); else explicit matmuls over grouped queries."""
    if native:
        return block_forward(qt, kt, vt, None, causal=causal)
    g = qt.size(1) // kt.size(1)
    b, h, t, d = qt.shape
    mask = causal_mask(0, t, 0, g, dtype=qt.dtype, device=qt.device) if causal else None
    out, lse = math_block_forward(qt.reshape(b, kt.size(1), g * t, d), kt, vt, mask)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


def _attend_backward(dot: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, ot: torch.Tensor,
                     lse: torch.Tensor, causal: bool, native: bool) -> tuple[torch.Tensor, ...]:
    """(dq share, dk, dv) of one block given the merged out/lse (shapes of qt, kt, vt)."""
    if native:
        return block_backward(dot, qt, kt, vt, ot, lse, None, causal=causal)
    g = qt.size(1) // kt.size(1)
    b, h, t, d = qt.shape

    def grp(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, kt.size(1), g * t, d)

    mask = causal_mask(0, t, 0, g, dtype=qt.dtype, device=qt.device) if causal else None
    dq, dk, dv = math_block_backward(grp(dot), grp(qt), kt, vt, grp(ot), lse.reshape(b, kt.size(1), g * t), mask)
    return dq.reshape(b, h, t, d), dk, dv


Block = tuple[torch.Tensor, torch.Tensor]  # (k, v) of some keys, (b, heads, len, d) layout


def forward_blocks(qt: torch.Tensor, own: Block, carry: list[Block], spans: SliceSpans,
                   native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-causal attention of one slice: qt (b, H, t, d); ``own`` the slice's keys; ``carry`` the
    prefix keys the carry-in document sees ([D, start), in any number of blocks) -> out (b, t, H, d) in q's
    dtype, lse (b, H, t)."""
    b, h, t, d = qt.shape
    out = qt.new_empty(b, t, h, d)  # (b, t, H, d): the model's view(b, t, H·d) of it is free
    lse = torch.empty(b, h, t, dtype=lse_dtype(qt.dtype), device=qt.device)
    for a, e in spans.segments:
        qs = qt[:, :, a:e]
        o, s = _attend(qs, own[0][:, :, a:e], own[1][:, :, a:e], True, native)
        if a == 0:  # the carry-in document also sees the prefix keys [D, start)
            for kb, vb in carry:
                o_p, s_p = _attend(qs, kb, vb, False, native)
                o, s = merge(o_p, s_p, o, s)
        out[:, a:e].copy_(o.transpose(1, 2))
        lse[:, :, a:e] = s
    return out, lse


def backward_blocks(dout: torch.Tensor, qt: torch.Tensor, own: Block, carry: list[Block], out: torch.Tensor,
                    lse: torch.Tensor, spans: SliceSpans,
                    native: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Block]]:
    """The same blocks' exact gradients given the merged out/lse: dq (b, t, H, d), the own keys' dk, dv
    (b, t, H_kv, d), and (dk, dv) (b, len, H_kv, d) for every carry block."""
    dot, ot = dout.transpose(1, 2), out.transpose(1, 2)
    dq = torch.empty_like(dout)  # (b, t, H, d)
    b, hk, t, d = own[0].shape
    dk, dv = own[0].new_empty(b, t, hk, d), own[1].new_empty(b, t, hk, d)
    carry_grads: list[Block] = []
    for a, e in spans.segments:
        rows = slice(a, e)
        g_q, g_k, g_v = _attend_backward(dot[:, :, rows], qt[:, :, rows], own[0][:, :, rows], own[1][:, :, rows],
                                         ot[:, :, rows], lse[:, :, rows], True, native)
        if a == 0:
            for kb, vb in carry:
                p_q, p_k, p_v = _attend_backward(dot[:, :, rows], qt[:, :, rows], kb, vb, ot[:, :, rows],
                                                 lse[:, :, rows], False, native)
                g_q = g_q + p_q
                carry_grads.append((p_k.transpose(1, 2), p_v.transpose(1, 2)))
        dq[:, rows].copy_(g_q.transpose(1, 2))
        dk[:, rows].copy_(g_k.transpose(1, 2))
        dv[:, rows].copy_(g_v.transpose(1, 2))
    return dq, dk, dv, carry_grads


class DocumentAttention(torch.autograd.Function):
    """q (b, t, H, d) of slice [start, end), its own k/v (b, t, H_kv, d) and the Window of the earlier
    slices' blocks, under document-causal attention (spans: SliceSpans) -> (b, t, H, d). The carry block is
    the window's rows [D, start), read block by block in place; blocks before D are never read."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                window: Window, spans: SliceSpans, native: bool) -> torch.Tensor:
        carry = _carry_blocks(window, spans)
        own = (k.transpose(1, 2), v.transpose(1, 2))
        out, lse = forward_blocks(q.transpose(1, 2), own, [c[2:] for c in carry], spans, native)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.spans, ctx.native = window, spans, native
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        window: Window = ctx.window
        carry = _carry_blocks(window, ctx.spans)
        own = (k.transpose(1, 2), v.transpose(1, 2))
        dq, dk, dv, carry_grads = backward_blocks(dout, q.transpose(1, 2), own, [c[2:] for c in carry], out, lse,
                                                  ctx.spans, ctx.native)
        for (i, row, _, _), (g_k, g_v) in zip(carry, carry_grads):
            window.deposit(i, g_k, g_v, row)  # (b, len, H_kv, d): rows [row, row + len) of block i
        return dq, *window.with_handed(dk, dv), None, None, None


def _carry_blocks(window: Window, spans: SliceSpans) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(block i, first row, k, v (b, H_kv, len, d)) of every window block reaching past D = spans.carry."""
    out, lo = [], 0
    for i, (kb, vb) in enumerate(zip(window.prefix_k, window.prefix_v)):
        hi = lo + kb.size(1)
        if hi > spans.carry:
            row = max(spans.carry - lo, 0)
            out.append((i, row, kb[:, row:].transpose(1, 2), vb[:, row:].transpose(1, 2)))
        lo = hi
    if lo != spans.start:
        raise ValueError(f"the window holds {lo} keys, the slice starts at {spans.start}")
    return out


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, spans: SliceSpans,
                       *, native: bool | None = None) -> torch.Tensor:
    """Document-causal attention of one slice over its block and the window (DocumentAttention). ``native``
    (default: on CPU) runs ATen's CPU flash kernel; otherwise the explicit-matmul blocks (any device)."""
    native = q.device.type == "cpu" if native is None else native
    return DocumentAttention.apply(q, k, v, window, spans, native)  # type: ignore[no-any-return]
