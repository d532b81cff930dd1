"""Query-out attention of one slice over the context-parallel group (zig-zag layout: context_parallel.py).

With the window of CP rank r = its local K/V blocks of slices 0 … j (the K/V store's per-slice blocks: the
rank's 2P rows of every earlier slice, then its own two pieces of slice j: A = piece r, B = piece 2c−1−r,
P tokens each) (:class:`CPAttention`):

* forward: all-gather q over CP (the slice's T = 2cP queries, rank order: rank r' holds rows
  [2P·r', 2P·(r'+1))); attend against the local window in at most four fused calls that compute only
  visible pairs (:meth:`SliceGeometry.blocks`), merged by log-sum-exp into a partial (out, lse) of all T
  queries; an all-to-all hands each rank the c partials of its own 2P queries, merged by log-sum-exp (a
  reduce-scatter whose reduction is the LSE merge);
* backward: all-gather (q, dout, out, lse) — the merged out/lse, so each key block's flash backward is
  exact (runtime/block_attention.py) —, compute the dq shares and every local block's dK/dV, reduce-scatter
  dq. dK/dV stay local; each earlier block's is handed down to the K/V store block by block as for c = 1.

Every rank does the same causal work per slice: T × S/c prefix pairs plus 2c − 1 full and two half P×P
blocks (its keys A are seen by the 2c − 1 − r later pieces, B by the r later ones). The bytes a rank
sends per layer and slice do not grow with the slice index (:func:`query_out_bytes`); ring attention
passes the window's K/V, which does (:func:`ring_bytes`). Nothing gathered is saved for the
backward: it is gathered again (q, out, lse are slice-sized; the saved tensors are this rank's share).

A partner on the window (attention context exchange: ``Window.fwd_peer`` / ``bwd_peer``) takes this rank's
blocks of the earliest ``volume`` slices to a pipeline partner at the same CP rank: the partner computes the
gathered queries against them (the exchange's Peer, grouped-query layout) and the result is merged in before
the CP merge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from slimpipe.runtime.block_attention import (
    block_backward, block_forward, causal_mask, lse_dtype, math_block_backward, math_block_forward, merge,
)
from slimpipe.runtime.slice_attention import Window, cat_blocks

__all__ = ["CPGroup", "CPAttention", "SliceGeometry", "cp_attention", "query_out_bytes", "ring_bytes"]

# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 has only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(slots=True)
class CPGroup:
    """The CP process group of one rank, with counters of what query-out moved and computed."""

    group: object
    """``ParallelState.cp_group``."""
    size: int
    """c."""
    rank: int
    """CP rank r."""
    sent_bytes: int = 0
    """Bytes this rank sent to the other CP ranks (all-gather, all-to-all, reduce-scatter), this step."""
    busy_s: float = 0.0
    """Seconds spent in the local attention blocks (not in collectives), this step."""
    calls: list[tuple[str, int]] = field(default_factory=list)
    """(collective, bytes sent) of every call when ``record`` is on (benchmarks)."""
    record: bool = False

    def reset(self) -> None:
        self.sent_bytes, self.busy_s = 0, 0.0
        self.calls.clear()

    def _count(self, what: str, nbytes: int) -> None:
        self.sent_bytes += nbytes
        if self.record:
            self.calls.append((what, nbytes))

    def all_gather(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each rank's tensors -> per tensor (c, *shape), rank order; one packed collective."""
        flat, specs = _pack(tensors)
        out = flat.new_empty(self.size * flat.numel())
        _ALL_GATHER(out, flat, group=self.group)
        self._count("all_gather", (self.size - 1) * flat.numel())
        return _unpack(out.view(self.size, -1), specs, lead=self.size)

    def all_to_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """tensors (c, *shape): row i goes to rank i; returns (c, *shape), row i from rank i."""
        flat, specs = _pack(tensors, lead=self.size)
        out = torch.empty_like(flat)
        dist.all_to_all_single(out, flat, group=self.group)
        self._count("all_to_all", (self.size - 1) * flat.size(1))
        return _unpack(out, specs, lead=self.size)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x (c, *shape): the sum over ranks of row ``rank``, shape ``shape``."""
        out = x.new_empty(x[0].numel())
        _REDUCE_SCATTER(out, x.contiguous().view(-1), group=self.group)
        self._count("reduce_scatter", (self.size - 1) * out.numel() * out.element_size())
        return out.view(x.shape[1:])


def _pack(tensors: list[torch.Tensor], lead: int | None = None) -> tuple[torch.Tensor, list]:
    """Bytes of several tensors in one uint8 buffer (larger element sizes first, so every part stays
    aligned when viewed back); with ``lead`` every tensor is (lead, …) and the buffer (lead, bytes)."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    parts, specs = [], [None] * len(tensors)
    for i in order:
        t = tensors[i].contiguous()
        flat = t.view(lead, -1) if lead else t.view(-1)
        parts.append(flat.view(torch.uint8))
        specs[i] = (t.shape[1:] if lead else t.shape, t.dtype, parts[-1].size(-1))
    return torch.cat(parts, dim=-1), [(i, specs[i]) for i in order]


def _unpack(buf: torch.Tensor, specs: list, lead: int) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(specs)
    offset = 0
    for i, (shape, dtype, nbytes) in specs:
        out[i] = buf[:, offset: offset + nbytes].contiguous().view(dtype).view(lead, *shape)
        offset += nbytes
    return out  # type: ignore[return-value]


# ---- query rows in rank order: rank r' holds rows [2P·r', 2P·(r'+1)) = its pieces r', 2c−1−r' -------
def _rank_rows(g: torch.Tensor) -> torch.Tensor:
    """(c, b, H, 2P, *rest) gathered -> (b, H, T, *rest) contiguous, rows in rank order."""
    c, b, h, two_p, *rest = g.shape
    return g.movedim(0, 2).reshape(b, h, c * two_p, *rest)


def _region(x5: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) (rank order) of a (b, H, c, 2P, *rest) view: whole ranks -> (b, H, k, 2P, *rest), part
    of one rank -> (b, H, hi − lo, *rest). A view."""
    two_p = x5.size(3)
    if lo % two_p == 0 and hi % two_p == 0:
        return x5[:, :, lo // two_p: hi // two_p]
    rank, off = divmod(lo, two_p)
    return x5[:, :, rank, off: off + hi - lo]


def _take(x: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Rows of x (b, H, T, *rest): a view for one range, else the ranges concatenated."""
    if len(rows) == 1:
        return x[:, :, rows[0][0]: rows[0][1]]
    return torch.cat([x[:, :, lo:hi] for lo, hi in rows], dim=2)


# ---- the blocks of one rank ---------------------------------------------------------------------------
Key = tuple[int, int, int | None]  # (segment, lo, hi): rows [lo, hi) of one local K/V segment (hi None: all)


@dataclass(frozen=True, slots=True)
class SliceGeometry:
    """One slice on one CP rank: the zig-zag pieces and the local K/V segments it attends to here: segments
    0 … prefix−1 are earlier slices' blocks (those no exchange partner computes), segment ``prefix`` is the
    slice's own block (pieces A, B)."""

    piece: int
    """P."""
    rank: int
    """r."""
    size: int
    """c."""
    prefix: int = 0
    """Earlier slices' K/V blocks attended here."""

    def blocks(self) -> list[Block]:
        """This rank's attention work as fused blocks over the gathered queries (rows in rank order). With
        rank r' < r holding pieces r' < r and 2c−1−r' > 2c−1−r, and r' > r pieces between r and 2c−1−r:

        * ranks ≤ r, all rows × the prefix, unmasked;
        * rank r's own rows × its own keys [A; B], causal: in local order (pieces r, 2c−1−r for queries
          and keys) the upper-left causal mask is exactly the positions' rule;
        * ranks < r, second pieces (2c−1−r' > 2c−1−r) × [A; B], unmasked (their first pieces see neither);
        * ranks > r, all rows × prefix and A, unmasked (both pieces lie between A and B)."""
        p, r, c, n = self.piece, self.rank, self.size, self.prefix
        two, pre = 2 * p, tuple((i, 0, None) for i in range(n))
        own: Key = (n, 0, None)
        out = [Block(rows=((0, two * (r + 1)),), keys=pre, causal=False, fresh=True)] if n else []
        out.append(Block(rows=((two * r, two * (r + 1)),), keys=(own,), causal=True, fresh=not n))
        if r:
            halves = tuple((two * q + p, two * (q + 1)) for q in range(r))
            out.append(Block(rows=halves, keys=(own,), causal=False, fresh=not n))
        if r < c - 1:
            out.append(Block(rows=((two * (r + 1), two * c),), keys=(*pre, (n, 0, p)), causal=False, fresh=True))
        return out


@dataclass(frozen=True, slots=True)
class Block:
    """One attention block of a rank: one fused call per key segment, merged by log-sum-exp."""

    rows: tuple[tuple[int, int], ...]
    """Query row ranges of the gathered slice, rank order."""
    keys: tuple[Key, ...]
    """The key rows, segment by segment."""
    causal: bool
    """Square upper-left causal (rows and keys in the same local order), else unmasked."""
    fresh: bool
    """No earlier block wrote these rows: the first call stores instead of merging."""


def _kernel_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, H, tq, d), k/v (b, H_kv, tk, d) -> out (b, H, tq, d), lse (b, H, tq). ``fused`` (default: on
    CPU): ATen's flash kernel with native GQA; else explicit matmuls in fp32/fp64 (K/V heads expanded)."""
    if q.device.type == "cpu" if fused is None else fused:
        return block_forward(q, k, v, None, causal=causal)
    g = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = causal_mask(0, k.size(2), 0, 1, dtype=q.dtype, device=q.device) if causal else None
    return math_block_forward(q, k, v, mask)


def _kernel_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, causal: bool,
                fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq share, dk, dv) of one block given the merged out/lse (same kernels as _kernel_fwd)."""
    if q.device.type == "cpu" if fused is None else fused:
        return block_backward(dout, q, k, v, out, lse, None, causal=causal)  # type: ignore[return-value]
    hk, g = k.size(1), q.size(1) // k.size(1)
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = causal_mask(0, k.size(2), 0, 1, dtype=q.dtype, device=q.device) if causal else None
    dq, dk, dv = math_block_backward(dout, q, ke, ve, out, lse, mask)
    b, _, tk, d = dk.shape
    return dq, dk.view(b, hk, g, tk, d).sum(2), dv.view(b, hk, g, tk, d).sum(2)


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """(b, H, T, …) contiguous -> (b, H_kv, g·T, …): the exchange's grouped-query layout (a view)."""
    b, h, t, *rest = x.shape
    return x.reshape(b, hk, (h // hk) * t, *rest)


def _segments(window: Window, k: torch.Tensor, v: torch.Tensor, vol: int) -> tuple[list, list]:
    """The local key segments (b, H_kv, L, d): the window's blocks vol … j−1 (read in place), then own."""
    ks = [x.transpose(1, 2) for x in (*window.prefix_k[vol:], k)]
    vs = [x.transpose(1, 2) for x in (*window.prefix_v[vol:], v)]
    return ks, vs


class CPAttention(torch.autograd.Function):
    """q (b, 2P, H, d) of this rank's pieces, its own k/v (b, 2P, H_kv, d) and the Window of its earlier
    blocks -> (b, 2P, H, d): query-out attention over the CP group (module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                window: Window, geo: SliceGeometry, comm: CPGroup) -> torch.Tensor:
        (qs,) = comm.all_gather([q.transpose(1, 2)])  # (c, b, H, 2P, d)
        qa = _rank_rows(qs)  # (b, H, T, d)
        hk, vol = k.size(2), window.volume(backward=False)
        pending = window.fwd_peer.forward(  # type: ignore[union-attr]
            _grouped(qa, hk), cat_blocks(window.prefix_k[:vol]), cat_blocks(window.prefix_v[:vol])) if vol else None
        ks, vs = _segments(window, k, v, vol)
        blocks = replace(geo, prefix=len(ks) - 1).blocks()
        out, lse = _local_forward(qa, ks, vs, blocks, comm)  # (c, b, H, 2P, d), (c, b, H, 2P): by destination
        if pending is not None:
            out_r, lse_r = pending.wait()  # rank-order rows, grouped layout
            o5, l5 = out.permute(1, 2, 0, 3, 4), lse.permute(1, 2, 0, 3)
            merge(o5, l5, out_r.reshape(o5.shape), lse_r.reshape(l5.shape), into=o5, lse_into=l5)
        outs, lses = comm.all_to_all([out, lse])  # row i: rank i's partial of my queries
        total = torch.logsumexp(lses, dim=0)  # (b, H, 2P)
        w = torch.exp(lses - total)[..., None]  # (c, b, H, 2P, 1); 0 where a rank saw no key
        res = q.new_empty(q.shape)  # (b, 2P, H, d): the model's view(b, t, H·d) of it is free
        res.transpose(1, 2).copy_((outs.to(w.dtype) * w).sum(0))
        ctx.save_for_backward(q, k, v, res, total)
        ctx.window, ctx.geo, ctx.comm = window, geo, comm
        return res

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, res, lse = ctx.saved_tensors
        window: Window = ctx.window
        comm: CPGroup = ctx.comm
        gathered = comm.all_gather([q.transpose(1, 2), dout.transpose(1, 2), res.transpose(1, 2), lse])
        qa, da, oa, la = (_rank_rows(x) for x in gathered)  # (b, H, T, …), rank order
        hk, vol = k.size(2), window.volume(backward=True)
        pending = (window.bwd_peer.backward(  # type: ignore[union-attr]
            _grouped(da, hk), _grouped(qa, hk), _grouped(oa, hk), _grouped(la, hk),
            cat_blocks(window.prefix_k[:vol]), cat_blocks(window.prefix_v[:vol])) if vol else None)
        ks, vs = _segments(window, k, v, vol)
        blocks = replace(ctx.geo, prefix=len(ks) - 1).blocks()
        dq, dks, dvs = _local_backward(da, qa, ks, vs, oa, la, blocks, comm)  # dq (c, b, H, 2P, d) by owner
        for i, (g_k, g_v) in enumerate(zip(dks[:-1], dvs[:-1]), start=vol):
            window.deposit(i, g_k.transpose(1, 2), g_v.transpose(1, 2))
        if pending is not None:
            dq_r, dk_r, dv_r = pending.wait()  # dk/dv (b, H_kv, rows of blocks 0 … vol−1, d)
            dq5 = dq.permute(1, 2, 0, 3, 4)
            dq5 += dq_r.reshape(dq5.shape)
            window.deposit_joined(dk_r, dv_r)
        mine = comm.reduce_scatter(dq)  # (b, H, 2P, d)
        dk, dv = window.with_handed(dks[-1].transpose(1, 2), dvs[-1].transpose(1, 2))  # (b, 2P, H_kv, d)
        return mine.transpose(1, 2), dk, dv, None, None, None


def _keys(ks: list[torch.Tensor], vs: list[torch.Tensor], key: Key) -> tuple[torch.Tensor, torch.Tensor]:
    seg, lo, hi = key
    return ks[seg][:, :, lo:hi], vs[seg][:, :, lo:hi]


def _local_forward(qa: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], blocks: list[Block],
                   comm: CPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (out, lse) of all T queries over this rank's key segments ks/vs (b, H_kv, L_i, d), block by
    block, laid out by the rank that owns the queries: (c, b, H, 2P, d), (c, b, H, 2P) — the all-to-all's
    input. Rows no block reaches (no local key) get out 0, lse −∞."""
    t0 = time.perf_counter()
    b, h, t, d = qa.shape
    c = comm.size
    covered = sum(hi - lo for blk in blocks if blk.fresh for lo, hi in blk.rows)
    if covered == t:
        out, lse = qa.new_empty(c, b, h, t // c, d), qa.new_empty(c, b, h, t // c, dtype=lse_dtype(qa.dtype))
    else:
        out = qa.new_zeros(c, b, h, t // c, d)
        lse = qa.new_full((c, b, h, t // c), float("-inf"), dtype=lse_dtype(qa.dtype))
    o5, l5 = out.permute(1, 2, 0, 3, 4), lse.permute(1, 2, 0, 3)  # (b, H, c, 2P, …) views
    for blk in blocks:
        qb = _take(qa, blk.rows)
        for n, key in enumerate(blk.keys):
            o, s = _kernel_fwd(qb, *_keys(ks, vs, key), blk.causal)
            at = 0
            for lo, hi in blk.rows:
                ro, rl = _region(o5, lo, hi), _region(l5, lo, hi)
                po = o[:, :, at: at + hi - lo].reshape(ro.shape)
                pl = s[:, :, at: at + hi - lo].reshape(rl.shape)
                at += hi - lo
                if blk.fresh and n == 0:
                    ro.copy_(po)
                    rl.copy_(pl)
                else:
                    merge(ro, rl, po, pl, into=ro, lse_into=rl)
    comm.busy_s += time.perf_counter() - t0
    return out, lse


def _local_backward(da: torch.Tensor, qa: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                    oa: torch.Tensor, la: torch.Tensor, blocks: list[Block],
                    comm: CPGroup) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dq shares of all T queries laid out by owner (c, b, H, 2P, d) — the reduce-scatter's input —, dk and
    dv of every key segment) of this rank's blocks."""
    t0 = time.perf_counter()
    b, h, t, d = qa.shape
    dq = qa.new_zeros(comm.size, b, h, t // comm.size, d)
    dq5 = dq.permute(1, 2, 0, 3, 4)
    dks, dvs = [torch.zeros_like(x) for x in ks], [torch.zeros_like(x) for x in vs]
    for blk in blocks:
        db, qb, ob, lb = (_take(x, blk.rows) for x in (da, qa, oa, la))
        lb = lb.contiguous()
        for seg, lo, hi in blk.keys:
            g = _kernel_bwd(db, qb, *_keys(ks, vs, (seg, lo, hi)), ob, lb, blk.causal)
            at = 0
            for r_lo, r_hi in blk.rows:
                region = _region(dq5, r_lo, r_hi)
                region += g[0][:, :, at: at + r_hi - r_lo].reshape(region.shape)
                at += r_hi - r_lo
            dks[seg][:, :, lo:hi] += g[1]
            dvs[seg][:, :, lo:hi] += g[2]
    comm.busy_s += time.perf_counter() - t0
    return dq, dks, dvs


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, geo: SliceGeometry,
                 comm: CPGroup) -> torch.Tensor:
    """Query-out attention of one slice on one CP rank (see :class:`CPAttention`)."""
    if q.size(1) != 2 * geo.piece or k.size(1) != 2 * geo.piece:
        raise ValueError(f"CP attention: q has {q.size(1)} tokens and its K/V block {k.size(1)} rows, "
                         f"expected 2P = {2 * geo.piece}")
    return CPAttention.apply(q, k, v, window, geo, comm)


# ---- bytes per rank per layer and slice (BENCHMARKS.md) --------------------------------------------------
def query_out_bytes(*, tokens: int, c: int, heads: int, head_dim: int, elem: int, lse_elem: int,
                    backward: bool) -> int:
    """Bytes one rank sends for one slice of ``tokens`` (= T) in one layer: forward all-gather of q and
    all-to-all of (out, lse); backward all-gather of (q, dout, out, lse) and reduce-scatter of dq. Each
    moves (c − 1)/c of a slice-sized tensor: independent of the slice index."""
    row = (c - 1) * (tokens // c) * heads
    fwd = row * (2 * head_dim * elem + lse_elem)
    return fwd + row * (4 * head_dim * elem + lse_elem) if backward else fwd


def ring_bytes(*, tokens: int, j: int, c: int, kv_heads: int, head_dim: int, elem: int,
               backward: bool) -> int:
    """Bytes one rank sends for slice j (0-based) of ``tokens`` in one layer with ring attention: the local
    K/V window ((j + 1)·T/c rows) travels c − 1 hops forward and again backward, and its dK/dV accumulator
    c hops back to its owner (torch's templated ring backward does the same): grows with j."""
    hop = (j + 1) * (tokens // c) * 2 * kv_heads * head_dim * elem
    return (c - 1) * hop + ((c - 1) + c) * hop if backward else (c - 1) * hop
