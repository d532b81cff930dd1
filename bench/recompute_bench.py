"""Activation recompute and offload: stage-0 peak per mode, measured vs the memory model, and step time.

Every rank of one pipeline in this process (LocalPipelineRuntime, one thread; the accounting is the
distributed runtime's), one forward+backward per (sequence length, mode), modes alternating in rounds in
one run, step time the least CPU time of the process over the rounds (one thread: robust to the shared
machine's load). Per row: stage 0's peak of resident saved activations + K/V (the in-flight
peak the memory model predicts: ``activations + kv_cache``, scaled from its bf16 bytes to the run's
dtype), its dK/dV peak, the host bytes of offload, the total, and the step time against ``none``. Then
the longest context that fits a fixed stage-0 activation budget for 1f1b, slimpipe and slimpipe with full
recompute, from the measured bytes per token. Reproduce the BENCHMARKS.md tables with::

    flock /work/measure.lock python bench/recompute_bench.py --seq 1024 2048 4096
    flock /work/measure.lock python bench/recompute_bench.py --seq 8192
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slimpipe.config import ParallelConfig, load_model
from slimpipe.runtime import LocalPipelineRuntime
from slimpipe.runtime.offload import OffloadConfig
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload, memory_model

MIB = float(1 << 20)
GIB = float(1 << 30)
MODES = ("none", "partial", "partial+fc1", "full")


def _rows(args: argparse.Namespace) -> list[tuple[str, str, str, float]]:
    """(label, schedule, recompute, α) of every measured row (``--rows`` keeps a subset, by label)."""
    rows = [(m, "slimpipe", m, 0.0) for m in MODES]
    rows.append((f"offload {args.offload:g}", "slimpipe", "none", args.offload))
    rows.append(("1f1b none", "1f1b", "none", 0.0))
    return [r for r in rows if not args.rows or r[0] in args.rows]


def _schedule(args: argparse.Namespace, name: str):
    n = args.slices if name == "slimpipe" else 1
    return build(name, p=args.pp, m=args.microbatches, n=n, warmup=args.warmup)


def measure(args: argparse.Namespace, cfg, seq: int, row) -> dict[str, float]:
    _, name, mode, alpha = row
    rt = LocalPipelineRuntime(cfg, _schedule(args, name), dtype=getattr(torch, args.dtype), recompute=mode,
                              offload=OffloadConfig(ratio=alpha, min_bytes=args.offload_min_bytes))
    toks = torch.randint(0, cfg.vocab_size, (args.microbatches, seq + 1), generator=torch.Generator().manual_seed(0))
    t0 = time.process_time()  # one thread: CPU time of this process resists the shared machine's load
    res = rt.forward_backward(toks)
    cpu = time.process_time() - t0
    tr = rt.executors[0].tracker
    return {"act": tr.peak_act, "dkv": tr.peak_dkv, "total": res.peak_activation_bytes[0],
            "off": res.peak_offloaded_bytes[0], "cpu": cpu}


def measure_rows(args: argparse.Namespace, cfg, seq: int, rows) -> list[dict[str, float]]:
    """Every row ``--repeat`` times, rows alternating within each round; memory of the first round (it is
    deterministic), the least CPU time over the rounds."""
    got = [measure(args, cfg, seq, row) for row in rows]
    for _ in range(args.repeat - 1):
        for g, row in zip(got, rows):
            g["cpu"] = min(g["cpu"], measure(args, cfg, seq, row)["cpu"])
    return got


def predicted(args: argparse.Namespace, cfg, seq: int, row) -> dict[str, float]:
    """The memory model's stage-0 activation terms, scaled from bf16 to the run's dtype."""
    _, name, mode, alpha = row
    sched = _schedule(args, name)
    work = Workload(model=cfg, parallel=ParallelConfig(pp=args.pp, slices=sched.num_slices), seq_len=seq,
                    global_batch=args.microbatches, recompute=mode, offload=alpha)
    mem = memory_model(work, sched)[0]
    scale = torch.empty((), dtype=getattr(torch, args.dtype)).element_size() / 2
    return {"act": (mem.activations + mem.kv_cache) * scale, "off": mem.offloaded * scale,
            "kv_grad": mem.kv_grad * scale}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--warmup", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--offload", type=float, default=0.5)
    ap.add_argument("--offload-min-bytes", type=int, default=64 << 10,
                    help="offload threshold (64 KiB: a slice-layer's tensors of the small preset are < 1 MiB)")
    ap.add_argument("--budget-gib", type=float, default=1.0, help="stage-0 activation budget of the last table")
    ap.add_argument("--rows", nargs="*", default=[], help="labels of the rows to run (default: all)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of every row; step time is the least")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 OpenMP threads on a shared 2-core machine spin-wait
    cfg = load_model(args.model)
    per_token: dict[str, list[float]] = {}
    print(f"model {args.model}, p={args.pp}, m={args.microbatches}, n={args.slices}, {args.dtype}, one thread; "
          f"stage 0, MiB; step = least CPU seconds of {args.repeat} alternating rounds")
    print("| s | row | act measured | act model | ratio | dK/dV | offloaded (model) | total | step CPU s | vs none |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.seq:
        base = None
        rows = _rows(args)
        for row, got in zip(rows, measure_rows(args, cfg, seq, rows)):
            pred = predicted(args, cfg, seq, row)
            base = got["cpu"] if row[0] == "none" or base is None else base
            per_token.setdefault(row[0], []).append(got["total"] / seq)
            off = f"{got['off'] / MIB:.1f} ({pred['off'] / MIB:.1f})" if row[3] else "–"
            print(f"| {seq} | {row[0]} | {got['act'] / MIB:.1f} | {pred['act'] / MIB:.1f} | "
                  f"{got['act'] / pred['act']:.3f} | {got['dkv'] / MIB:.2f} | {off} | {got['total'] / MIB:.1f} | "
                  f"{got['cpu']:.2f} | {got['cpu'] / base:.2f}× |", flush=True)
    if not {"1f1b none", "none", "full"} <= set(per_token):
        return 0
    budget = args.budget_gib * GIB
    print(f"\nlongest context in a {args.budget_gib:g} GiB stage-0 activation budget (total = saved + K/V + "
          f"dK/dV, bytes per token measured at s = {args.seq[-1]})")
    print("| schedule | stage-0 bytes per token | longest s | vs 1f1b |")
    print("|---|---|---|---|")
    label = {"1f1b none": "1f1b", "none": f"slimpipe n={args.slices}", "full": f"slimpipe n={args.slices} + full recompute"}
    ref = budget / per_token["1f1b none"][-1]
    for key in ("1f1b none", "none", "full"):
        bpt = per_token[key][-1]
        print(f"| {label[key]} | {bpt:,.0f} | {budget / bpt:,.0f} | {budget / bpt / ref:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
