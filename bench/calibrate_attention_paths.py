"""What calibrate times for a slice after a prefix: the runtime's block path vs one contiguous prefix call.

The runtime's ``slice_attention`` makes one fused call per earlier slice's K/V block and merges them by
log-sum-exp (its backward hands each block's dK/dV to an accumulator); calibrate timed one call over a
contiguous P-token prefix (``window_attention``) until 2026-12-05. Both are timed in this process, one
thread, thread CPU time, round-robin (BENCHMARKS.md "Simulator validation", F):

    python bench/calibrate_attention_paths.py            # tiny's shapes, ≈ 10 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from slimpipe.calibrate.measure import Progress, _Ctx, _measure_attention, _time_fwd_bwd
from slimpipe.config import load_model
from slimpipe.runtime.attention import MaskCache, window_attention

__all__ = ["main"]

GRID = ((64, 960), (128, 384), (256, 768), (512, 1536), (1024, 1024), (1024, 3072))
SEQ = max(t + p for t, p in GRID)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="model preset or JSON (default tiny)")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds (median; default 3)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_model(a.model)
    ctx = _Ctx(dev=torch.device("cpu"), dt=torch.float32, reps=9, clock=time.thread_time,
               bar=Progress(1, stream=open(os.devnull, "w")))
    masks, res = MaskCache("auto"), {g: ([], []) for g in GRID}
    for _ in range(a.rounds):
        for t, p in GRID:
            def make(t=t, p=p):
                def r(n, heads):  # (1, n, heads, head_dim)
                    return torch.randn(1, n, heads, cfg.head_dim, requires_grad=True)
                return r(t, cfg.num_heads), r(p + t, cfg.num_kv_heads), r(p + t, cfg.num_kv_heads)
            def one_call(q, k, v, p=p):  # the K/V window [0, P + T) in one tensor
                return window_attention(q, k, v, p, masks, SEQ)
            res[(t, p)][0].append(_time_fwd_bwd(make, one_call, ctx))
            blk = _measure_attention(cfg, [(t, p)], ctx)[0]
            res[(t, p)][1].append((blk["fwd_s"], blk["bwd_s"]))
    print("| T | P | blocks | one call fwd ms | blocks fwd ms | one ÷ blocks | one call bwd ms "
          "| blocks bwd ms | one ÷ blocks |\n|---|---|---|---|---|---|---|---|---|")
    for (t, p), (one, blk) in res.items():
        of, ob = (statistics.median(x[i] for x in one) for i in (0, 1))
        bf, bb = (statistics.median(x[i] for x in blk) for i in (0, 1))
        print(f"| {t} | {p} | {p // t} | {of * 1e3:.3f} | {bf * 1e3:.3f} | {of / bf:.2f} | {ob * 1e3:.3f} | "
              f"{bb * 1e3:.3f} | {ob / bb:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
