"""Context parallelism measured: bytes per slice (query-out vs ring), zig-zag balance, K/V memory per rank.

Four measurements (BENCHMARKS.md "Context parallelism"), each a subcommand:

* ``bytes``: c forked gloo ranks run one layer's attention for every slice j = 0 … n−1 of a sequence,
  forward and backward, twice: query-out (runtime/cp_attention.py, the runtime's own code, bytes counted by
  its CPGroup) and ring attention (below: the local K/V window travels c − 1 hops forward and again
  backward, its dK/dV accumulator c hops back to its owner — torch's templated ring backward does the
  same), bytes counted at every send. Both outputs and all gradients are compared with one causal SDPA
  over the whole sequence. Printed beside the closed forms ``query_out_bytes`` / ``ring_bytes``.
* ``balance``: the attention blocks of each CP rank for one slice, timed one rank after the other in this
  process (no contention between ranks: the cores are shared), forward + backward, min of ``--repeat``;
  zig-zag (pieces r, 2c−1−r) against a contiguous split (pieces 2r, 2r+1) of the same slice. One thread,
  process CPU time (other processes' load does not inflate it), rounds alternating between the ranks.
* ``memory``: PipelineRuntime steps at c = 1, 2, 4 (pp 1, one sequence): the runtime's peak K/V bytes per
  rank (K/V blocks + dK/dV accumulators) and its peak activation bytes.

    python bench/cp_bench.py bytes --c 2 4 --slices 4
    python bench/cp_bench.py balance --c 2 4 --seq 8192
    python bench/cp_bench.py memory
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.distributed as dist

from slimpipe.runtime.context_parallel import ZigZag
from slimpipe.runtime.cp_attention import (
    Block, CPGroup, SliceGeometry, _local_backward, _local_forward, _rank_rows, cp_attention, query_out_bytes,
    ring_bytes,
)
from slimpipe.runtime.block_attention import merge
from slimpipe.runtime.forked import run_forked
from slimpipe.runtime.slice_attention import Window


# ---- ring attention over the K/V window (the comparison; fp64 math, masks from positions) -------------------
def _block(q, k, v, qpos, kpos):
    """Partial attention of q (b, H, tq, d) over k/v (b, H_kv, tk, d) with the causal rule by position:
    (out, lse), lse −inf and out 0 on rows that see no key."""
    g = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]))
    return p @ v, lse


def _block_grads(dout, q, k, v, out, lse, qpos, kpos):
    """(dq share, dk, dv) of one block given the merged out/lse."""
    hk, g = k.size(1), q.size(1) // k.size(1)
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.size(-1) ** -0.5
    s = (q @ ke.transpose(-1, -2)) * scale
    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ ve.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
    dq, dk = (ds @ ke) * scale, (ds.transpose(-1, -2) @ q) * scale
    b, _, tk, d = dk.shape
    return dq, dk.view(b, hk, g, tk, d).sum(2), dv.view(b, hk, g, tk, d).sum(2)


class _Ring:
    """Send to rank + 1, receive from rank − 1 on the CP group; counts the bytes this rank sends."""

    def __init__(self, rank: int, c: int) -> None:
        self.rank, self.c, self.sent = rank, c, 0

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, (self.rank + 1) % self.c), dist.P2POp(dist.irecv, buf, (self.rank - 1) % self.c)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        self.sent += x.numel() * x.element_size()
        return buf


def ring_slice(ring: _Ring, q, k, v, dout, pos_of, j: int):
    """Ring attention of slice j: q/dout (b, H, 2P, d) local, k/v (b, H_kv, W, d) the local window; returns
    (out, dq, dk, dv). ``pos_of(r)`` = (query positions of rank r's pieces of slice j, its window positions)."""
    c, r = ring.c, ring.rank
    qpos = pos_of(r)[0]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    kv = torch.cat([k, v])  # (2b, H_kv, W, d): what travels
    for i in range(c):
        if i:
            kv = ring.shift(kv)
        kk, vv = kv.chunk(2)
        o, s = _block(q, kk, vv, qpos, pos_of((r - i) % c)[1])
        out, lse = merge(out, lse, o, s)
    dq = torch.zeros_like(q)
    kv, acc = torch.cat([k, v]), None
    for i in range(c):
        if i:
            kv = ring.shift(kv)
            acc = ring.shift(acc)  # the dK/dV of the window now here, accumulated by the ranks before
        kk, vv = kv.chunk(2)
        gq, gk, gv = _block_grads(dout, q, kk, vv, out, lse, qpos, pos_of((r - i) % c)[1])
        dq += gq
        acc = torch.cat([gk, gv]) if acc is None else acc + torch.cat([gk, gv])
    acc = ring.shift(acc)  # c-th hop: back to the window's owner
    dk, dv = acc.chunk(2)
    return out, dq, dk, dv


# ---- bytes -------------------------------------------------------------------------------------------------
def _bytes_rank(rank: int, c: int, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    s, n, h, hk, d = args.seq, args.slices, args.heads, args.kv_heads, args.head_dim
    q, k, v, dout = (torch.randn(1, s, hh, d, dtype=torch.float64) for hh in (h, hk, hk, h))
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    full = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in ref), is_causal=True, enable_gqa=True).transpose(1, 2)
    full.backward(dout)
    bounds = tuple(s * i // n for i in range(n + 1))
    layouts = [ZigZag(c, rr, bounds) for rr in range(c)]
    positions = [z.positions() for z in layouts]
    lb = layouts[rank].local_bounds()
    mine = positions[rank]
    comm = CPGroup(dist.group.WORLD, c, rank, record=True)
    rows = []
    for j in range(n):
        sl = slice(lb[j], lb[j + 1])
        qj, dj = q[:, mine[sl]], dout[:, mine[sl]]
        kw, vw = k[:, mine[: lb[j + 1]]], v[:, mine[: lb[j + 1]]]
        leaves = [x.clone().requires_grad_() for x in (qj, kw[:, lb[j]:], vw[:, lb[j]:])]
        handed: dict[int, tuple] = {}  # this slice's dK/dV of the earlier blocks (the K/V store's deposits)
        window = Window(prefix_k=[kw[:, lb[i]:lb[i + 1]] for i in range(j)],
                        prefix_v=[vw[:, lb[i]:lb[i + 1]] for i in range(j)], handed=lambda: (None, None),
                        deposit=lambda i, dk, dv, row=0: handed.__setitem__(i, (dk, dv)))
        comm.reset()
        geo = SliceGeometry(piece=layouts[rank].piece(j), rank=rank, size=c)
        out = cp_attention(*leaves, window, geo, comm)
        fwd_bytes = comm.sent_bytes
        out.backward(dj)
        win_dk = torch.cat([*(handed[i][0] for i in range(j)), leaves[1].grad], 1)  # (b, window rows, H_kv, d)
        qo_err = max(float((a - b).abs().max()) for a, b in (
            (out.detach(), full.detach()[:, mine[sl]]), (leaves[0].grad, ref[0].grad[:, mine[sl]])))
        ring = _Ring(rank, c)
        pos_of = (lambda rr, j=j: (positions[rr][layouts[rr].local_bounds()[j]: layouts[rr].local_bounds()[j + 1]],
                                   positions[rr][: layouts[rr].local_bounds()[j + 1]]))
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        r_out, r_dq, r_dk, r_dv = ring_slice(ring, t(qj), t(kw), t(vw), t(dj), pos_of, j)
        ring_err = max(float((t(a) - b).abs().max()) for a, b in (
            (r_out, full.detach()[:, mine[sl]]), (r_dq, ref[0].grad[:, mine[sl]])))
        # Window dK/dV: this slice's contribution only; the same for both algorithms.
        win_err = float((t(r_dk) - win_dk).abs().max())
        rows.append(dict(j=j, qo_fwd=fwd_bytes, qo_total=comm.sent_bytes, ring_total=ring.sent,
                         err=max(qo_err, ring_err, win_err)))
    return rows


def bytes_table(args: argparse.Namespace) -> list[dict]:
    out = []
    for c in args.c:
        per_rank = run_forked(_bytes_rank, c, args, timeout_s=120)
        tokens = args.seq // args.slices
        for j in range(args.slices):
            meas = [r[j] for r in per_rank]
            f_qo = query_out_bytes(tokens=tokens, c=c, heads=args.heads, head_dim=args.head_dim, elem=8,
                                   lse_elem=8, backward=True)
            f_ring = ring_bytes(tokens=tokens, j=j, c=c, kv_heads=args.kv_heads, head_dim=args.head_dim, elem=8,
                                backward=True)
            out.append(dict(c=c, j=j, qo_formula=f_qo, qo_measured=sorted({m["qo_total"] for m in meas}),
                            ring_formula=f_ring, ring_measured=sorted({m["ring_total"] for m in meas}),
                            max_err=max(m["err"] for m in meas)))
    return out


# ---- balance -----------------------------------------------------------------------------------------------
def _time_ranks(qa, ks, vs, layouts: list[list[Block]], dout, repeat: int) -> list[float]:
    """Each rank's forward + backward block time over the key segments ks/vs (the prefix blocks, then the
    slice's own), min over ``repeat`` rounds; ranks take turns inside a round so machine noise hits them
    alike; one warm-up round first."""
    c = len(layouts)
    best = [math.inf] * c
    for rnd in range(repeat + 1):
        for r, blocks in enumerate(layouts):
            comm = CPGroup(None, c, r)
            t0 = time.process_time()  # CPU time: what load from other processes does not inflate
            out, lse = _local_forward(qa, ks, vs, blocks, comm)  # partials by owner: (c, b, H, 2P, …)
            _local_backward(dout, qa, ks, vs, _rank_rows(out), _rank_rows(lse), blocks, comm)
            if rnd:
                best[r] = min(best[r], time.process_time() - t0)
    return best


def _contiguous_blocks(c: int, r: int, p: int, prefix: int) -> list[Block]:
    """The same slice split into c contiguous runs (rank r holds pieces 2r, 2r+1, so rank order is position
    order): the unbalanced layout, in the same fused blocks over ``prefix`` earlier blocks and the own one."""
    two, t = 2 * p, 2 * c * p
    pre, own = tuple((i, 0, None) for i in range(prefix)), (prefix, 0, None)
    out = [Block(rows=((0, two * (r + 1)),), keys=pre, causal=False, fresh=True)] if prefix else []
    out.append(Block(rows=((two * r, two * (r + 1)),), keys=(own,), causal=True, fresh=not prefix))
    if r < c - 1:
        out.append(Block(rows=((two * (r + 1), t),), keys=(*pre, own), causal=False, fresh=True))
    return out


def balance_table(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one core, like one rank; process CPU time then is this thread's work
    rows = []
    h, hk, d, t = args.heads, args.kv_heads, args.head_dim, args.seq // args.slices
    for c in args.c:
        p = t // (2 * c)
        for j in (0, args.slices - 1):
            qa = torch.randn(1, h, t, d)
            ks = [torch.randn(1, hk, 2 * p, d) for _ in range(j + 1)]  # the local blocks of slices 0 … j
            vs = [torch.randn(1, hk, 2 * p, d) for _ in range(j + 1)]
            dout = torch.randn(1, h, t, d)
            zigzag = [SliceGeometry(piece=p, rank=r, size=c, prefix=j).blocks() for r in range(c)]
            contiguous = [_contiguous_blocks(c, r, p, j) for r in range(c)]
            for name, layouts in (("zig-zag", zigzag), ("contiguous", contiguous)):
                times = _time_ranks(qa, ks, vs, layouts, dout, args.repeat)
                rows.append(dict(c=c, j=j, layout=name, ms=[round(x * 1e3, 2) for x in times],
                                 max_over_min=round(max(times) / min(times), 3)))
    return rows


# ---- K/V memory ----------------------------------------------------------------------------------------------
def _memory_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    from slimpipe.config import ModelConfig
    from slimpipe.runtime import ParallelState, PipelineRuntime
    from slimpipe.schedule.builders import build

    st = ParallelState.create(pp=1, cp=world, timeout_s=120)
    cfg = ModelConfig(name="cp-mem", num_layers=2, hidden=args.heads * args.head_dim, ffn=4 * args.heads * args.head_dim,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, vocab_size=256)
    rt = PipelineRuntime(cfg, build("slimpipe", p=1, m=1, n=args.slices), st, seed=0)
    toks = torch.randint(0, 256, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    res = rt.forward_backward(toks)
    return dict(kv=res.peak_kv_bytes[0], act=res.peak_activation_bytes[0], loss=res.loss)


def memory_table(args: argparse.Namespace) -> list[dict]:
    rows, base = [], None
    for c in (1, *args.c):
        per = run_forked(_memory_rank, c, args, timeout_s=300)
        kv = per[0]["kv"]
        base = base or kv
        rows.append(dict(c=c, kv_bytes=[r["kv"] for r in per], act_bytes=[r["act"] for r in per],
                         kv_ratio=round(kv / base, 4), loss=per[0]["loss"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("bytes", "balance", "memory"))
    ap.add_argument("--c", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.seq = args.seq or {"bytes": 256, "balance": 8192, "memory": 4096}[args.what]
    table = {"bytes": bytes_table, "balance": balance_table, "memory": memory_table}[args.what](args)
    for row in table:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": table}, fh, indent=1)


if __name__ == "__main__":
    main()
