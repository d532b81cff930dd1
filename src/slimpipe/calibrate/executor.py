"""The runtime's overheads measured where the runtime pays them: a short run of the real executor.

Two forked single-threaded gloo ranks (``slimpipe.runtime.forked``) run ``PipelineRuntime`` steps of a few
small schedules, as training and ``bench/validate_sim.py`` run them, and both ranks' executor traces (one
wall clock: the ranks share the machine) give

* per (stage, slice) the median thread CPU time of its F and B actions (``TraceEvent.cpu_s``): the units
  ``fit._fit_composition`` turns into the composition factor κ and the per-action overhead (kernels + the
  executor's own work: K/V bookkeeping, activation accounting, autograd, while the other rank computes on
  the other core and gloo's threads run). CPU time, not wall: other users' load would otherwise inflate
  the profile (a descheduled rank's wall time grows, its CPU time does not), and the profile would move
  from one calibration to the next; the wall medians are kept beside them (``fwd_wall_s``);
* the wall time of every SEND (the ``isend`` call and the executor's bookkeeping around it) and of every
  *late* RECV, one posted after its SEND started (gloo's rendezvous: the receiver's ready notice must reach
  the sender, whose progress thread then writes the bytes): ``p2p_send_s`` and ``p2p_recv_s``;
* the measured step times, which the fitted profile must reproduce through the simulator
  (``fit.step_consistency``).

Single-process runtime units and a bare ``isend``/``irecv`` micro-benchmark, used before, missed what the
2-rank run pays: both ranks computing at once on shared cores, the sender's progress thread competing
with its compute, the executor's per-message work (BENCHMARKS.md, "Simulator validation").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from slimpipe.config import ModelConfig
from slimpipe.schedule.actions import Kind, parse_action

__all__ = ["fastest_pass", "mean_pass", "message_costs", "measure_executor"]

Trace = list[tuple[str, float, float, float]]  # (action, start, end, CPU seconds); wall clock seconds


def message_costs(traces: Sequence[Trace]) -> tuple[list[float], list[float]]:
    """(SEND wall times, late-RECV wall times) of one step from both ranks' traces (one wall clock: the
    ranks share a machine). A RECV is late when its SEND started before the RECV did."""
    sent: dict[tuple[bool, int, int, int], float] = {}
    sends, late = [], []
    for trace in traces:
        for name, start, end, *_ in trace:
            a = parse_action(name)
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                fwd = a.kind is Kind.SEND_F
                sent[(fwd, a.stage + 1 if fwd else a.stage - 1, a.microbatch, a.seq_slice)] = start
                sends.append(end - start)
    for trace in traces:
        for name, start, end, *_ in trace:
            a = parse_action(name)
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                posted = sent.get((a.kind is Kind.RECV_F, a.stage, a.microbatch, a.seq_slice))
                if posted is not None and posted < start:
                    late.append(end - start)
    return sends, late


def _rank_body(rank: int, world: int, cfg: ModelConfig, runs: Sequence[tuple[str, int, int, int]],
               reps: int) -> list[dict]:
    """Steps of each run on this rank: step times and traces (the first step warms up and is dropped)."""
    from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime
    from slimpipe.schedule.builders import build

    state = ParallelState.create(pp=world, timeout_s=300.0)
    out = []
    for name, s, n, m in runs:
        rt = PipelineRuntime(cfg, build(name, p=world, m=m, n=n), state, seed=0, optim=OptimConfig(lr=1e-4))
        tokens = torch.randint(0, cfg.vocab_size, (m, s + 1), generator=torch.Generator().manual_seed(0))
        steps, traces = [], []
        for rep in range(reps + 1):
            dist.barrier()  # both ranks start together, as the simulator's clocks do
            # whole training steps: each schedule runs after the previous step's optimizer update, as in
            # training (the update's sweep over parameters and moments leaves the caches colder)
            res = rt.train_step(tokens)
            if rep:
                steps.append(res.step_time_s)
                traces.append([(e.action, e.start_s, e.end_s, e.cpu_s) for e in res.trace])
        out.append({"steps": steps, "traces": traces})
    return out


def _units(traces: Sequence[Trace], n: int, stages: int) -> list[dict]:
    """Median F/B thread CPU seconds (and wall seconds) per (stage, slice) over every step of both ranks."""
    cpu: dict[tuple[int, int, Kind], list[float]] = {}
    wall: dict[tuple[int, int, Kind], list[float]] = {}
    for trace in traces:
        for name, start, end, spent in trace:
            a = parse_action(name)
            if a.kind in (Kind.F, Kind.B):
                cpu.setdefault((a.stage, a.seq_slice, a.kind), []).append(spent)
                wall.setdefault((a.stage, a.seq_slice, a.kind), []).append(end - start)
    med = statistics.median
    return [{"stage": st, "slice": j, "fwd_s": med(cpu[(st, j, Kind.F)]), "bwd_s": med(cpu[(st, j, Kind.B)]),
             "fwd_wall_s": med(wall[(st, j, Kind.F)]), "bwd_wall_s": med(wall[(st, j, Kind.B)])}
            for st in range(stages) for j in range(n)]


def _gap(trace: Trace) -> float:
    """Wall time of one rank's step outside its actions, per action (the executor's own loop)."""
    span = max(e for _, _, e, _ in trace) - min(s for _, s, _, _ in trace)
    return (span - sum(e - s for _, s, e, _ in trace)) / len(trace)


def measure_executor(cfg: ModelConfig, runs: Sequence[tuple[str, int, int, int]], reps: int) -> list[dict]:
    """One record per run (schedule, s, n, m) of two gloo ranks: F/B unit medians, step times and message
    costs, in the layout ``fit`` reads (``per_action``: unit times come from the trace)."""
    from slimpipe.runtime.forked import run_forked

    t0 = time.perf_counter()
    ranks = run_forked(_rank_body, 2, cfg, list(runs), reps, timeout_s=600.0)
    out = []
    for i, (name, s, n, m) in enumerate(runs):
        r0, r1 = ranks[0][i], ranks[1][i]  # type: ignore[index]
        sends, late = [], []
        for t0_, t1_ in zip(r0["traces"], r1["traces"]):
            s_, l_ = message_costs([t0_, t1_])
            sends, late = sends + s_, late + l_
        gaps = [_gap(t) for t in r0["traces"] + r1["traces"]]
        out.append({"schedule": name, "seq_len": s, "slices": n, "pp": 2, "microbatches": m,
                    "layers": cfg.num_layers, "step_s": statistics.median(r0["steps"]), "steps_s": r0["steps"],
                    "per_action": True, "clock": "thread CPU, 2-rank executor",
                    "units": _units(r0["traces"] + r1["traces"], n, 2),
                    "send_s": sends, "late_recv_s": late, "gap_s": gaps})
    out[0]["elapsed_s"] = time.perf_counter() - t0
    return out


def fastest_pass(passes: Sequence[list[dict]]) -> list[dict]:
    """Passes of ``measure_executor`` over the same runs merged: per run the pass with the smaller total
    of unit CPU times (the machine's speed per CPU second drifts for seconds at a time with what runs
    beside it; the kernel benchmarks between the passes take their median in the quieter moments too),
    with every pass's message times pooled (wall time, a distribution, not a speed)."""
    out = []
    for runs in zip(*passes):
        best = min(runs, key=lambda r: sum(u["fwd_s"] + u["bwd_s"] for u in r["units"]))
        out.append({**best, "send_s": [x for r in runs for x in r["send_s"]],
                    "late_recv_s": [x for r in runs for x in r["late_recv_s"]],
                    "gap_s": [x for r in runs for x in r.get("gap_s", ())],
                    "passes_units_s": [sum(u["fwd_s"] + u["bwd_s"] for u in r["units"]) for r in runs]})
    out[0]["elapsed_s"] = sum(p[0].get("elapsed_s", 0.0) for p in passes)
    return out


def mean_pass(passes: Sequence[list[dict]]) -> list[dict]:
    """Passes of ``measure_executor`` over the same runs merged: per run and unit the mean of the passes'
    CPU medians (passes taken before and after other work: the speed in between is their mean, to first
    order), every pass's message times pooled."""
    out = []
    for runs in zip(*passes):
        units = [{**us[0], **{k: statistics.fmean(u[k] for u in us)
                              for k in ("fwd_s", "bwd_s", "fwd_wall_s", "bwd_wall_s")}}
                 for us in zip(*(r["units"] for r in runs))]
        out.append({**runs[0], "units": units, "step_s": statistics.fmean(r["step_s"] for r in runs),
                    "send_s": [x for r in runs for x in r["send_s"]],
                    "late_recv_s": [x for r in runs for x in r["late_recv_s"]],
                    "gap_s": [x for r in runs for x in r.get("gap_s", ())]})
    return out
