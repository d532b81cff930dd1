"""Vocabulary parallelism: per-stage parameter/activation memory and compute, real runs and simulator.

Real runs (CPU, one thread): every rank of one pipeline in one process (LocalPipelineRuntime, the same
handlers as the distributed runtime), with and without ``vocab_parallel``; per rank the parameter bytes,
the peak saved-for-backward bytes (storage-deduplicated, parameters excluded; with K/V buffers in
"activation"), and the best-of-steps busy seconds (compute of its own actions, vocabulary collectives
included; off and on steps alternate so machine load hits both). ``--gloo`` also times train steps on p
forked processes (gloo, alternating, median). Then the simulator (analytic cost, H800) for
the configurations in SIM_ROWS. Reproduce the BENCHMARKS.md tables with::

    python bench/vocab_bench.py                               # small preset, V = 32000, p 4, n 4, s 512
    python bench/vocab_bench.py --vocab-size 256 --no-sim     # the byte vocabulary: nothing to gain
    python bench/vocab_bench.py --pp 2 --gloo --no-sim        # step time on 2 real processes
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from slimpipe.config import ParallelConfig, load_model
from slimpipe.schedule.builders import build

MIB = float(1 << 20)
GIB = float(1 << 30)

# (label, model, overrides, layout, seq_len, global batch, schedule, recompute)
SIM_ROWS = [
    ("70B 512K (paper row)", "llama-70b", {}, dict(tp=4, cp=2, pp=16, slices=16, vpp=5), 524288, 8,
     "slimpipe", "partial+fc1"),
    ("70B 64K n8 v1", "llama-70b", {}, dict(tp=8, pp=8, dp=2, slices=8), 65536, 64, "slimpipe",
     "partial+fc1"),
    ("7B 32K p4 n4", "llama-7b", {}, dict(tp=1, pp=4, slices=4), 32768, 8, "slimpipe", "partial+fc1"),
    ("7B 32K p4 n4, V 32000", "llama-7b", {"vocab_size": 32000}, dict(tp=1, pp=4, slices=4), 32768, 8,
     "slimpipe", "partial+fc1"),
    ("7B 4K p4 1F1B", "llama-7b", {}, dict(tp=1, pp=4), 4096, 16, "1f1b", "none"),
    ("7B 4K p8 n2 v4", "llama-7b", {}, dict(tp=1, pp=8, slices=2, vpp=4), 4096, 16, "slimpipe", "none"),
]


def _tokens(args: argparse.Namespace, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (args.microbatches, args.seq + 1), generator=gen)


def measure_local(args: argparse.Namespace) -> dict[bool, dict[str, list[float]]]:
    """Per-rank figures of the local runtime, vocab-parallel off and on (steps alternate between the two,
    so load on the shared machine hits both alike; busy is the best of the steps)."""
    from slimpipe.runtime import LocalPipelineRuntime

    cfg = load_model(args.model, vocab_size=args.vocab_size, num_layers=args.layers)
    sched = build(args.schedule, p=args.pp, m=args.microbatches, n=args.slices, v=args.vpp)
    dtype = getattr(torch, args.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    rts = {vp: LocalPipelineRuntime(cfg, sched, dtype=dtype, seed=0, vocab_parallel=vp)
           for vp in (False, True)}
    busy: dict[bool, list[list[float]]] = {vp: [[] for _ in range(args.pp)] for vp in rts}
    last = {}
    for step in range(args.steps + 1):  # step 0 warms up
        for vp, rt in rts.items():
            rt.zero_grad()
            last[vp] = rt.forward_backward(_tokens(args, cfg.vocab_size, step))
            for r in range(args.pp):
                if step:
                    busy[vp][r].append(last[vp].busy_s[r])
    return {vp: {"params": [sum(q.numel() for _, q in rt.rank_parameters(r)) * size for r in range(args.pp)],
                 "saved": list(last[vp].peak_saved_bytes), "act": list(last[vp].peak_activation_bytes),
                 "busy": [min(b) for b in busy[vp]]} for vp, rt in rts.items()}


def _gloo_rank(rank: int, world: int, args: argparse.Namespace) -> dict[bool, float]:
    """One gloo rank (slimpipe.runtime.forked: single-threaded, FileStore): median step time off/on."""
    from slimpipe.runtime import ParallelState, PipelineRuntime

    state = ParallelState.create(pp=world, dp=1, timeout_s=900.0)
    cfg = load_model(args.model, vocab_size=args.vocab_size, num_layers=args.layers)
    sched = build(args.schedule, p=world, m=args.microbatches, n=args.slices, v=args.vpp)
    rts = {vp: PipelineRuntime(cfg, sched, state, dtype=getattr(torch, args.dtype), vocab_parallel=vp)
           for vp in (False, True)}
    steps: dict[bool, list[float]] = {vp: [] for vp in rts}
    for s in range(args.steps + 1):  # alternate off/on; step 0 warms up
        for vp, rt in rts.items():
            steps[vp].append(rt.train_step(_tokens(args, cfg.vocab_size, s)).step_time_s)
    return {vp: statistics.median(t[1:]) for vp, t in steps.items()}


def measure_gloo(args: argparse.Namespace) -> dict[bool, float]:
    from slimpipe.runtime.forked import run_forked

    return run_forked(_gloo_rank, args.pp, args, timeout_s=900.0)[0]


def simulate_rows() -> list[str]:
    from slimpipe.sim import Workload, evaluate, load_hardware

    hw = load_hardware("h800")
    lines = ["| config | vocab-parallel | step s | bubble % | rank 0 param+grad+optim GiB | last rank "
             "param+grad+optim GiB | highest peak GiB (rank) |", "|---|---|---|---|---|---|---|"]
    for label, model, over, layout, s, batch, sched, rec in SIM_ROWS:
        for vp in (False, True):
            wl = Workload(model=load_model(model, **over), parallel=ParallelConfig(**layout), seq_len=s,
                          global_batch=batch, recompute=rec, vocab_parallel=vp)
            ev = evaluate(wl, sched, hardware=hw)
            mem, rep = ev.memory, ev.report
            states = [(mb.params_grads + mb.optimizer) / GIB for mb in mem]
            top = max(mem, key=lambda mb: mb.peak)
            lines.append(f"| {label} | {'on' if vp else 'off'} | {rep.step_time_s:.3f} | "
                         f"{100 * rep.bubble_ratio:.2f} | {states[0]:.2f} | {states[-1]:.2f} | "
                         f"{top.peak / GIB:.2f} ({top.rank}) |")
    return lines


def _table(local: dict[bool, dict[str, list[float]]], pp: int) -> list[str]:
    lines = ["| vocab-parallel | rank | params MiB | peak saved MiB | peak activation MiB | busy s |",
             "|---|---|---|---|---|---|"]
    for vp in (False, True):
        d = local[vp]
        for r in range(pp):
            lines.append(f"| {'on' if vp else 'off'} | {r} | {d['params'][r] / MIB:.2f} | "
                         f"{d['saved'][r] / MIB:.2f} | {d['act'][r] / MIB:.2f} | {d['busy'][r]:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="preset (default small: 8 layers, h 256)")
    ap.add_argument("--vocab-size", type=int, default=32000, help="V override (default 32000)")
    ap.add_argument("--layers", type=int, default=None, help="L override")
    ap.add_argument("--schedule", default="slimpipe")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (median)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gloo", action="store_true", help="also time train steps on pp forked gloo processes")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"real runs: {args.model} V={args.vocab_size} {args.schedule} p{args.pp} n{args.slices} "
          f"v{args.vpp} s={args.seq} m={args.microbatches} {args.dtype}, local runtime, 1 thread")
    local = measure_local(args)
    print("\n".join(_table(local, args.pp)))
    if args.gloo:
        times = measure_gloo(args)
        change = 100 * (times[True] / times[False] - 1)
        print(f"\ngloo p={args.pp} train step (median of {args.steps}, alternating): "
              f"off {times[False]:.3f} s, on {times[True]:.3f} s ({change:+.1f} %)")
    if not args.no_sim:
        print("\nsimulator (analytic cost, H800):")
        print("\n".join(simulate_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
