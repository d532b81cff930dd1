"""Does uniform slicing's causal imbalance cost SlimPipe its lead? Equal slices, equal slices + attention
context exchange, and equal-FLOP slices side by side in the simulator, in time and in memory.

For each layout (Llama-70B, H800 preset, 4 Mi tokens per step) three simulations of the same schedule:

* ``equal``      : SlimPipe's uniform slices (slice j costs linear + attention ∝ j + ½ blocks);
* ``exchange``   : uniform slices with the attention context exchange, unclipped (``--attn-balance n``);
* ``equal-flop`` : ``--slice-split equal-flop``: slice lengths whose prefix-aware forward FLOPs are equal
  (long early slices, short late ones; Seq1F1B's rule applied to SlimPipe's schedule).

Per row: step time, bubble, MFU (executed FLOPs), the F time of the last slice ÷ the first on a middle stage
(what each unit costs; the exchange moves work at run time instead), peak memory and the components the
split moves (activations, recompute buffer, dK/dV buffer, exchange buffers). Then where the time of the
best SlimPipe and best Megatron plans of the 512K cell goes in the cost model (compute, recompute, TP, CP,
p2p) — the terms where the model's Megatron baseline may be stronger than the one the paper measured.

    python bench/slice_split.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from slimpipe.config import ParallelConfig, load_model
from slimpipe.schedule.actions import Kind
from slimpipe.sim import Workload, evaluate, layer_flops, load_hardware
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.flops import ATTN_BWD_FACTOR

H800 = load_hardware("h800")
L70 = load_model("llama-70b")
# (label, s, B, t, c, p, d, n, v, recompute, α): the paper's layouts (SlimPipe reference §6.4, §14) and
# the planner's best equal-slice SlimPipe plan at 512K (BENCHMARKS "Paper claims", before the split).
LAYOUTS = [
    ("paper 512K", 512 << 10, 8, 4, 2, 16, 1, 16, 5, "partial+fc1", 0.0),
    ("paper 512K n32", 512 << 10, 8, 4, 2, 16, 1, 32, 5, "partial+fc1", 0.0),
    ("paper 512K n64", 512 << 10, 8, 4, 2, 16, 1, 64, 5, "partial+fc1", 0.0),
    ("planner 512K", 512 << 10, 8, 4, 2, 16, 1, 128, 5, "none", 0.75),
    ("paper 2048K", 2048 << 10, 2, 4, 4, 16, 1, 64, 5, "partial+fc1", 0.75),
]
VARIANTS = (("equal", "equal", 0), ("exchange", "equal", -1), ("equal-flop", "equal-flop", 0))
GIB = 2**30


def _row(label: str, wl: Workload, variant: str, split: str, xchg: int) -> dict:
    t0 = time.perf_counter()
    ev = evaluate(wl, "slimpipe", hardware=H800, slice_split=split,
                  attn_balance=wl.parallel.slices if xchg else 0)
    rep = ev.report
    top = rep.memory[rep.peak_rank]
    n = wl.parallel.slices
    spread = ev.cost.compute_time(Kind.F, 1, n - 1) / ev.cost.compute_time(Kind.F, 1, 0)
    return {"layout": label, "variant": variant, "step_s": rep.step_time_s, "bubble": rep.bubble_ratio,
            "mfu": rep.mfu, "unit_spread": spread, "peak_gib": top.peak / GIB, "act_gib": top.activations / GIB,
            "recomputed_gib": top.recomputed / GIB, "kv_grad_gib": top.kv_grad / GIB,
            "exchange_gib": top.exchange / GIB, "first_slice": (ev.schedule.slice_fractions()[0] * n),
            "sim_s": time.perf_counter() - t0}


def _breakdown(name: str, wl: Workload, split: str) -> dict[str, float]:
    """Where one micro-batch's F + B time of a middle stage goes in the analytic cost model, seconds."""
    par = wl.parallel
    ev = evaluate(wl, name, hardware=H800, slice_split=split)
    cost: AnalyticCost = ev.cost  # type: ignore[assignment]
    shard, out = par.tp * par.cp, dict.fromkeys(("gemm", "attention", "recompute", "tp", "cp", "p2p"), 0.0)
    gemm, attn = H800.peak_flops * H800.gemm_efficiency, H800.peak_flops * H800.attention_efficiency
    layers = wl.layers_per_stage
    for j in range(par.slices):
        fl = layer_flops(wl.model, cost.tokens[j], cost.prefix[j])
        out["gemm"] += layers * 3 * fl.linear / gemm / shard
        out["attention"] += layers * (1 + ATTN_BWD_FACTOR) * fl.attention / attn / shard
        if wl.recompute == "partial+fc1":
            out["recompute"] += layers * fl.fc1 / gemm / shard
        elif wl.recompute == "full":
            out["recompute"] += layers * (fl.linear / gemm + fl.attention / attn) / shard
        cp = cost._layer_comm(j)[2]  # forward CP exchange of one layer; backward ≈ 2×
        cf, cb = cost._comm_times(j)  # every collective of one layer (TP, CP, EP), forward and backward
        out["cp"] += layers * 3 * cp
        out["tp"] += layers * (cf + cb - 3 * cp)
        out["p2p"] += cost.transfer_time(Kind.SEND_F, 1, j) + cost.transfer_time(Kind.SEND_B, 1, j)
    return {**out, "step_s": ev.report.step_time_s, "bubble": ev.report.bubble_ratio, "mfu": ev.report.mfu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    rows = []
    print("| layout | t c p n v, recompute, α | slices | step s | bubble % | MFU % | F last ÷ first slice "
          "| peak GiB | activations | recomputed | dK/dV | exchange buffers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, s, b, t, c, p, d, n, v, rec, alpha in LAYOUTS:
        wl = Workload(model=L70, seq_len=s, global_batch=b, recompute=rec, offload=alpha, vocab_parallel=True,
                      parallel=ParallelConfig(tp=t, cp=c, pp=p, dp=d, slices=n, vpp=v))
        for variant, split, xchg in VARIANTS:
            r = _row(label, wl, variant, split, xchg)
            rows.append(r)
            print(f"| {label} | t{t} c{c} p{p} n{n} v{v}, {rec}, {alpha:g} | {variant} | {r['step_s']:.1f} | "
                  f"{100 * r['bubble']:.2f} | {100 * r['mfu']:.1f} | {r['unit_spread']:.2f} | {r['peak_gib']:.2f} | "
                  f"{r['act_gib']:.2f} | {r['recomputed_gib']:.2f} | {r['kv_grad_gib']:.2f} | "
                  f"{r['exchange_gib']:.2f} |", flush=True)
    print("\nWhere the time goes (one micro-batch, F + B of a middle stage, cost model seconds):\n")
    print("| plan (512K, 128 GPUs) | GEMM | attention | recompute | TP (+EP) comm | CP comm | p2p | step s | MFU % |")
    print("|---|---|---|---|---|---|---|---|---|")
    plans = [("best SlimPipe: t2 c4 p16 n64 v5, none, α 0.75, vocab-PP, equal-flop", "slimpipe",
              ParallelConfig(tp=2, cp=4, pp=16, slices=64, vpp=5), "none", 0.75, True, "equal-flop"),
             ("best Megatron: t8 c8 p2 v40, partial+fc1", "interleaved-1f1b",
              ParallelConfig(tp=8, cp=8, pp=2, vpp=40), "partial+fc1", 0.0, False, "equal")]
    for label, name, par, rec, alpha, vocab, split in plans:
        wl = Workload(model=L70, seq_len=512 << 10, global_batch=8, recompute=rec, offload=alpha,
                      vocab_parallel=vocab, parallel=par)
        bd = _breakdown(name, wl, split)
        total = sum(bd[k] for k in ("gemm", "attention", "recompute", "tp", "cp", "p2p"))
        cells = " | ".join(f"{100 * bd[k] / total:.1f} %" for k in ("gemm", "attention", "recompute", "tp", "cp",
                                                                     "p2p"))
        print(f"| {label} | {cells} | {bd['step_s']:.1f} | {100 * bd['mfu']:.1f} |")
        rows.append({"plan": label, **bd})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
