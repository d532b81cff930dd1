"""Attention context exchange on real processes: step time and per-rank busy time with and without.

p forked gloo processes (one torch thread each, FileStore rendezvous) train a tiny Llama whose long
sequence makes attention dominate. Every rank builds one PipelineRuntime per configuration (exchange off,
and on with each threshold) over the same weights, then the configurations take turns step by step
(off, on, off, on, ...) so machine noise hits them alike. Per step and rank it records the step time, the
compute-action busy time, the time the exchange blocked on the partner (inside F/B, so part of busy) and
the blocks handed over / served. Prints a table, optionally writes JSON::

    python bench/exchange_bench.py --pp 2 --seq 4096 --slices 8 --microbatches 4 --rounds 4
    python bench/exchange_bench.py --pp 4 --vpp 2 --seq 8192 --slices 8 --thresholds 100 --json out.json
    python bench/exchange_bench.py --sim --thresholds 4 100      # the simulated long-context table

Busy time is what the executor counts (F and B wall time on that rank); "busy − wait" subtracts the
exchange waits, i.e. the work the rank really did; CPU is the rank's process CPU time over the step, which
machine load does not inflate (wall times do: run on an idle machine, one core per rank). "Replayed step"
re-times the step from the measured per-unit CPU times with the dependency-driven dry run (messages free,
exchange owners ending no earlier than their helpers): a load-independent step time of the same work.
Without exchange every rank does the same work; with it owners give attention away and helpers take it on,
so compute moves between ranks while step time shows whether the balance paid for the rendezvous it needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from slimpipe.config import ModelConfig
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.actions import Kind
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import exchanges
from slimpipe.schedule.dryrun import _dry_run


def _model(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(name="exchange-bench", num_layers=args.pp * args.vpp * args.layers_per_stage,
                       hidden=args.hidden, ffn=2 * args.hidden, num_heads=args.heads, num_kv_heads=args.heads,
                       head_dim=args.hidden // args.heads, vocab_size=256)


def _time_units(executor, store: dict[str, float]) -> None:
    """Record each F/B's thread CPU time (blocking waits excluded, unlike its wall time) into ``store``."""
    for kind in (Kind.F, Kind.B):
        handler = executor.handlers[kind]

        def timed(a, handler=handler) -> None:
            t0 = time.thread_time()
            handler(a)
            store[str(a)] = time.thread_time() - t0

        executor.handlers[kind] = timed


def _replay(schedule, units: list[dict[str, float]]) -> float:
    """Makespan of the schedule replayed with the measured per-unit CPU times (dependency-driven dry run,
    free messages; an exchange's owner ends no earlier than its helper, as the simulator models it)."""
    cost = {k: v for per_rank in units for k, v in per_rank.items()}
    for x in exchanges(schedule):
        o, h = str(x.owner), str(x.helper)
        cost[o] = max(cost[o], cost[h])
    return _dry_run(schedule, duration=lambda a: cost.get(str(a), 0.0), latency=0.0, check="replay").makespan


def _step(rt: PipelineRuntime, tokens: torch.Tensor, state: ParallelState,
          unit_cpu: dict[str, float]) -> dict:
    """One timed forward_backward; every rank's figures gathered (collective)."""
    rt.zero_grad()
    unit_cpu.clear()
    dist.barrier(group=state.pp_group)
    cpu0 = time.process_time()
    res = rt.forward_backward(tokens)
    cpu = time.process_time() - cpu0
    ex = rt.executor.exchange
    mine = torch.tensor([res.busy_s[state.pp_rank], ex.wait_s if ex else 0.0, ex.sent if ex else 0,
                         ex.served if ex else 0, cpu], dtype=torch.float64)
    allr = [torch.empty_like(mine) for _ in range(state.pp)]
    dist.all_gather(allr, mine, group=state.pp_group)
    units: list = [None] * state.pp
    dist.all_gather_object(units, dict(unit_cpu), group=state.pp_group)
    return {"replay_s": _replay(rt.schedule, units), "step_s": res.step_time_s, "loss": res.loss,
            "busy_s": [float(x[0]) for x in allr], "wait_s": [float(x[1]) for x in allr],
            "sent": [int(x[2]) for x in allr], "served": [int(x[3]) for x in allr],
            "cpu_s": [float(x[4]) for x in allr]}


def _rank(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    """One gloo rank (slimpipe.runtime.forked: single-threaded, FileStore); rank 0 returns the rows."""
    state = ParallelState.create(pp=world, dp=1, timeout_s=args.timeout)
    sched = build("slimpipe", p=world, m=args.microbatches, n=args.slices, v=args.vpp, warmup=args.warmup)
    cfg = _model(args)
    configs = [0, *args.thresholds]
    rts = {t: PipelineRuntime(cfg, sched, state, dtype=torch.float32, seed=0, attn_balance=t)
           for t in configs}
    unit_cpu: dict[str, float] = {}
    for rt in rts.values():
        _time_units(rt.executor, unit_cpu)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.microbatches, args.seq + 1), generator=gen)
    rows = []
    for rnd in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is dropped
        for t in configs:
            row = _step(rts[t], tokens, state, unit_cpu)
            if rnd > 0:
                rows.append({"threshold": t, "round": rnd, **row})
    if rank != 0:
        return None
    pairs = {t: len(exchanges(rts[t].schedule)) for t in configs}
    return {"rows": rows, "exchanges": pairs}


def _summary(data: dict, args: argparse.Namespace) -> list[dict]:
    out = []
    for t in [0, *args.thresholds]:
        rows = [r for r in data["rows"] if r["threshold"] == t]
        p = len(rows[0]["busy_s"])
        compute = [statistics.mean(r["busy_s"][i] - r["wait_s"][i] for r in rows) for i in range(p)]
        busy = [statistics.mean(r["busy_s"][i] for r in rows) for i in range(p)]
        cpu = [statistics.median(r["cpu_s"][i] for r in rows) for i in range(p)]
        out.append({
            "attn_balance": t, "exchanges": data["exchanges"][str(t)] if str(t) in data["exchanges"]
            else data["exchanges"][t], "step_s_median": statistics.median(r["step_s"] for r in rows),
            "step_s_all": [r["step_s"] for r in rows], "busy_s": busy, "compute_s": compute,
            "replay_s_median": statistics.median(r["replay_s"] for r in rows),
            "wait_s": [statistics.mean(r["wait_s"][i] for r in rows) for i in range(p)],
            "compute_spread": (max(compute) - min(compute)) / statistics.mean(compute),
            "cpu_s": cpu, "cpu_spread": (max(cpu) - min(cpu)) / statistics.mean(cpu),
            "blocks_sent": rows[-1]["sent"], "blocks_served": rows[-1]["served"], "loss": rows[-1]["loss"],
        })
    return out


def _table(summary: list[dict], args: argparse.Namespace) -> str:
    base, base_replay = summary[0]["step_s_median"], summary[0]["replay_s_median"]
    head = (f"slimpipe p={args.pp} v={args.vpp} n={args.slices} m={args.microbatches} s={args.seq} "
            f"(h={args.hidden}, {args.heads} heads, {args.layers_per_stage} layer(s)/stage), fp32, "
            f"{args.rounds} alternating rounds, 1 thread per rank")
    lines = [head, "| attn-balance | exchanges | step wall (median) | vs off | replayed step (CPU) | vs off "
             "| per-rank busy − wait, s | per-rank exchange wait, s | spread | per-rank CPU s | CPU spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['attn_balance'] or 'off'} | {s['exchanges']} | {s['step_s_median']:.3f} s | "
                     f"{s['step_s_median'] / base:.3f} | {s['replay_s_median']:.3f} s | "
                     f"{s['replay_s_median'] / base_replay:.3f} | "
                     f"{' / '.join(f'{x:.2f}' for x in s['compute_s'])} | "
                     f"{' / '.join(f'{x:.2f}' for x in s['wait_s'])} | {100 * s['compute_spread']:.1f} % | "
                     f"{' / '.join(f'{x:.2f}' for x in s['cpu_s'])} | {100 * s['cpu_spread']:.1f} % |")
    return "\n".join(lines) + "\n"


# Simulated long-context configurations (Llama-70B, h800 preset, partial+fc1 recompute, t4 c2 unless said):
# (label, model, s, B, tp, cp, pp, n, v).
SIM_CONFIGS = [
    ("512K interleaved", "llama-70b", 524288, 8, 4, 2, 16, 32, 5),
    ("512K non-interleaved", "llama-70b", 524288, 8, 4, 2, 16, 32, 1),
    ("512K p8 v2", "llama-70b", 524288, 8, 4, 2, 8, 16, 2),
    ("512K p4 n16", "llama-70b", 524288, 4, 4, 2, 4, 16, 1),
    ("128K p4 n8", "llama-70b", 131072, 4, 4, 2, 4, 8, 1),
    ("2048K headline (c4)", "llama-70b", 2097152, 4, 4, 4, 16, 64, 5),
]


def simulated_table(thresholds: list[int]) -> str:
    """Step time, bubble and concurrent attention imbalance with and without the exchange (simulator)."""
    from slimpipe.config import ParallelConfig, load_model
    from slimpipe.sim import Workload, evaluate, load_hardware
    from slimpipe.sim.exchange import exchange_summary

    hw = load_hardware("h800")
    lines = ["| configuration | attn-balance | step s | vs off | bubble | concurrent attention max/min F | "
             "B | exchanges F / B | attention moved s | exchange GiB/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, name, seq, batch, tp, cp, pp, n, v in SIM_CONFIGS:
        wl = Workload(model=load_model(name), parallel=ParallelConfig(tp=tp, cp=cp, pp=pp, slices=n, vpp=v),
                      seq_len=seq, global_batch=batch, recompute="partial+fc1")
        base = evaluate(wl, "slimpipe", hardware=hw)
        rep = base.report
        lines.append(f"| {label}: t{tp} c{cp} p{pp} n{n} v{v} m{wl.microbatches} | off | "
                     f"{rep.step_time_s:.2f} | 1 | {100 * rep.bubble_ratio:.1f} % | | | | | |")
        for t in thresholds:
            ev = evaluate(wl, "slimpipe", hardware=hw, attn_balance=t)
            x = exchange_summary(ev.schedule, ev.cost)
            (f0, f1), (b0, b1) = x["attn_ratio_f"], x["attn_ratio_b"]
            lines.append(f"| | {t} | {ev.report.step_time_s:.2f} | "
                         f"{ev.report.step_time_s / base.report.step_time_s:.3f} | "
                         f"{100 * ev.report.bubble_ratio:.1f} % | {f0:.2f} → {f1:.2f} | "
                         f"{b0:.2f} → {b1:.2f} | "
                         f"{x['exchanges_f']} / {x['exchanges_b']} | {x['moved_attention_s']:.1f} | "
                         f"{x['exchange_bytes'] / 2**30:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers-per-stage", type=int, default=1)
    ap.add_argument("--warmup", default="auto")
    ap.add_argument("--thresholds", type=int, nargs="+", default=[100])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", default="", help="write the summary here")
    ap.add_argument("--sim", action="store_true", help="print the simulated long-context table instead")
    args = ap.parse_args(argv)
    if args.sim:
        sys.stdout.write(simulated_table(args.thresholds))
        return 0
    t0 = time.time()
    data = run_forked(_rank, args.pp, args, timeout_s=args.timeout)[0]
    summary = _summary(data, args)
    sys.stdout.write(_table(summary, args) + f"(wall {time.time() - t0:.0f} s)\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
