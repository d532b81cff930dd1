"""One call from a workload and a schedule name to a simulated Report: build → lower → simulate → memory.

Used by `slimpipe simulate`/`plot` and by the planner, so all of them see the same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from slimpipe.schedule.actions import Schedule, ScheduleMeta
from slimpipe.sim.cost import AnalyticCost, CostModel, UniformCost
from slimpipe.sim.flops import seq1f1b_partition
from slimpipe.sim.hardware import Hardware
from slimpipe.sim.memory import MemoryBreakdown, memory_model
from slimpipe.sim.metrics import Report, summarize
from slimpipe.sim.simulator import DeadlockError, Timeline, describe, simulate
from slimpipe.sim.workload import Workload

__all__ = [
    "Evaluation", "evaluate", "schedule_slice_weights", "SLICE_SPLITS", "resolve_slice_split", "COSTS",
    "precheck_memory", "closed_form_inflight", "weighted_inflight", "builder_warmup",
]

COSTS = ("analytic", "uniform")


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation:
    """The pieces of one simulated step, kept for plots and traces."""

    workload: Workload
    """What was simulated."""
    schedule: Schedule
    """The lowered schedule."""
    cost: CostModel
    """The cost model the timeline was computed with."""
    timeline: Timeline
    """Per-action start/end times."""
    memory: tuple[MemoryBreakdown, ...]
    """Per-rank memory model."""
    report: Report
    """Step-level figures."""


SLICE_SPLITS = ("auto", "equal", "equal-flop")
"""How a sequence is cut into n slices: equal token counts, or equal-FLOP slices (each slice's prefix-aware
forward FLOPs total/n: early slices long, late ones short, Seq1F1B's rule); auto = equal-flop for
seq1f1b (its own default), equal for every other builder (SlimPipe's uniform slices)."""


def resolve_slice_split(schedule_name: str, split: str) -> str:
    """``equal`` or ``equal-flop`` for the named builder (auto resolved); raises ConfigError on a bad name."""
    from slimpipe.config import ConfigError

    if split not in SLICE_SPLITS:
        raise ConfigError(f"--slice-split={split!r} is unknown: use one of {', '.join(SLICE_SPLITS)}")
    if split == "auto":
        return "equal-flop" if schedule_name == "seq1f1b" else "equal"
    return split


def schedule_slice_weights(workload: Workload, schedule_name: str, split: str = "auto", *,
                           equal_slices: bool = False) -> tuple[float, ...] | None:
    """The slice lengths ``evaluate`` builds with: None for equal slices, else the equal-FLOP fractions
    (seq1f1b_partition, boundaries rounded to t·2c tokens). ``equal_slices`` is the older spelling of
    ``split="equal"``. Shared with the planner's memory pre-check and bounds."""
    from slimpipe.config import ConfigError

    par = workload.parallel
    split = "equal" if equal_slices else resolve_slice_split(schedule_name, split)
    if split == "equal" or par.slices == 1:
        return None
    multiple = par.tp * (2 * par.cp if par.cp > 1 else 1)
    try:
        return seq1f1b_partition(workload.model, workload.seq_len, par.slices, multiple=multiple)
    except ValueError as exc:
        raise ConfigError(f"{exc}: use fewer --slices, a longer --seq-len or --slice-split equal") from None


def evaluate(workload: Workload, schedule_name: str, *, hardware: Hardware, cost: str = "analytic",
             warmup: str = "auto", equal_slices: bool = False, attn_balance: int = 0,
             slice_split: str = "auto") -> Evaluation:
    """Build the named schedule for ``workload``, lower it, simulate it and apply the memory model.

    attn_balance > 0 adds the attention context exchange (schedule/exchange.py, at most that many slices
    per exchange; sim/exchange.py models it).

    ``slice_split`` (SLICE_SPLITS): equal-flop cuts the sequence into computation-balanced slices
    (seq1f1b_partition, boundaries rounded to t·2c tokens), the default for seq1f1b; ``equal_slices`` is the
    older spelling of ``slice_split="equal"``.
    """
    from slimpipe.config import ConfigError
    from slimpipe.schedule.builders import build
    from slimpipe.schedule.passes import lower

    if cost not in COSTS:
        raise ConfigError(f"--cost={cost!r} is unknown: use one of {', '.join(COSTS)}")
    par = workload.parallel
    weights = schedule_slice_weights(workload, schedule_name, slice_split, equal_slices=equal_slices)
    built = build(schedule_name, p=par.pp, m=workload.microbatches, n=par.slices, v=par.vpp,
                  warmup=warmup, slice_weights=weights)
    sched = lower(built)
    model: CostModel = (UniformCost() if cost == "uniform"
                        else AnalyticCost(workload, hardware, sched.slice_fractions()))
    if workload.vocab_parallel and cost == "analytic":  # uniform: the authors' convention, no vocab work
        sched = _with_vocab_collectives(sched, model)
    if attn_balance:  # after the collectives: pairs come from a dry run that includes them
        from slimpipe.schedule.exchange import add_exchange

        sched = add_exchange(sched, attn_balance)
    try:
        timeline = simulate(sched, model)
    except DeadlockError as exc:
        g = sched.meta.g
        raise ConfigError(
            f"the {schedule_name} schedule for p={par.pp}, m={workload.microbatches}, n={par.slices}, "
            f"v={par.vpp} deadlocks ({describe(exc.stuck[0])}): use m·n divisible by g={g} "
            "(the micro-batch/slice group size)"
        ) from None
    memory = tuple(memory_model(workload, built))  # compute-only: a third of the actions to scan
    if attn_balance:
        from dataclasses import replace

        from slimpipe.sim.exchange import exchange_buffers

        memory = tuple(replace(mb, exchange=x) for mb, x in zip(memory, exchange_buffers(workload, sched)))
    report = summarize(workload, timeline, memory, hardware=None if cost == "uniform" else hardware,
                       dp_sync_s=model.step_overhead())
    return Evaluation(workload=workload, schedule=sched, cost=model, timeline=timeline, memory=memory,
                      report=report)


def _with_vocab_collectives(sched: Schedule, model: CostModel) -> Schedule:
    """Place VE/VH/VB (schedule/vocab.py) along a timeline with the cost model's compute durations."""
    from slimpipe.schedule.actions import COMPUTE_KINDS
    from slimpipe.schedule.vocab import add_vocab_parallel

    table: dict[tuple, float] = {}  # durations depend on (kind, stage, slice) only: ask once each

    def duration(a) -> float:
        key = (a.kind, a.stage, a.seq_slice)
        if key not in table:
            table[key] = model.compute_time(*key) if a.kind in COMPUTE_KINDS else 0.0
        return table[key]

    return add_vocab_parallel(sched, duration=duration)


# -- Memory-only pre-check: what `evaluate(...).memory` would say, without building the schedule. -------
# The planner prunes thousands of layouts with it before simulating a few dozen.

def builder_warmup(name: str, p: int, m: int, n: int, v: int) -> tuple[int | None, int]:
    """(w, g) as the named builder chooses them with ``warmup="auto"``; w None for GPipe. Raises
    ConfigError where the builder would ((m−1)·n·v < w·(p−1)). Uses the builders' own helpers; the grid
    test in tests/test_planner.py keeps this mapping equal to `build`."""
    from slimpipe.schedule import builders

    g = builders.group_size(p, n, v)
    if name == "gpipe":
        return None, g
    if name in ("slimpipe", "interleaved-1f1b"):  # double warm-up unless a group is partial
        w = builders._interleaved_warmup(name, "auto", p, m, n, v)
    else:  # 1f1b: Megatron's single; seq1f1b: its own rule, also single
        w = 1 if name == "seq1f1b" else builders.warmup_factor("auto", v, n)
    if name != "1f1b":  # 1F1B caps its warm-up at m instead (GPipe's order when m < p)
        builders._check_warmup_fits(name, p, m, n, v, w)
    return w, g


def closed_form_inflight(name: str, p: int, m: int, n: int, v: int) -> tuple[list[float], int | None, int]:
    """(peak in-flight units per rank, w, g) of the named builder's schedule, without building it.

    Equal slices only (seq1f1b's unequal segments weight units differently: build those). The first
    backward is B(stage (v−1)·p + r, micro-batch 0, the last slice of its group); its forward sits in the
    forward order at f₀ = group offset + (v−1)·|group| + its index, and the loop runs forwards until
    f₀ + 1 + w·(p−1−r) are in flight.
    """
    w, g = builder_warmup(name, p, m, n, v)
    total = m * n * v
    if w is None:
        return [float(total)] * p, None, g
    if g <= n:  # cycles of one micro-batch: its last cycle is backwarded first
        first = (n // g - 1) * g * v + (v - 1) * g + g - 1
    else:  # groups of g/n whole micro-batches: group 0 first, micro-batch 0's last slice
        size = min(g, m * n)
        first = (v - 1) * size + n - 1
    return [float(min(total, first + 1 + w * (p - 1 - r))) for r in range(p)], w, g


def precheck_memory(workload: Workload, name: str, slice_split: str = "auto") -> list[MemoryBreakdown]:
    """Per-rank memory of ``workload`` under the named schedule, from the closed-form in-flight counts.

    Equals ``evaluate(...).memory`` (tested); with unequal (equal-FLOP) slices the units carry different
    weights and ``weighted_inflight`` replays the builders' loop on the weights alone.
    """
    par = workload.parallel
    p, m, n, v = par.pp, workload.microbatches, par.slices, par.vpp
    weights = schedule_slice_weights(workload, name, slice_split)
    peaks, w, g = (closed_form_inflight(name, p, m, n, v) if weights is None
                   else weighted_inflight(name, p, m, n, v, weights))
    # memory_model reads only the shape (p, v, n, slice lengths, g, name) when the in-flight counts are given.
    shape = Schedule(name=name, num_ranks=p, virtual_stages=v, num_microbatches=m, num_slices=n,
                     ranks=tuple(() for _ in range(p)), slice_weights=weights, meta=ScheduleMeta(w=w, g=g))
    return memory_model(workload, shape, inflight=peaks)


def weighted_inflight(name: str, p: int, m: int, n: int, v: int,
                      weights: tuple[float, ...]) -> tuple[list[float], int | None, int]:
    """Weighted in-flight peaks (unit j weighs n·w_j) of the named builder's schedule with unequal slices,
    without building it; cached (the planner asks for the same shape under many t, c, recompute and α).

    Every rank's forward and backward orders visit the same (virtual stage, micro-batch, slice) pattern
    (``builders._orders``), so the weights of both orders are one pair of sequences, and rank r differs
    only by its warm-up target T_r = f₀ + 1 + w·(p−1−r). The loop runs F₀…F_{T−1}, then B₀, then F_{T+k}
    B_{k+1} pairs, then the remaining B: the peak is max(ΣF[<T], max_k ΣF[≤T+k] − ΣB[≤k]), read off prefix
    sums.
    """
    return _weighted_inflight(name, p, m, n, v, tuple(weights))


@functools.lru_cache(maxsize=256)
def _weighted_inflight(name: str, p: int, m: int, n: int, v: int,
                       weights: tuple[float, ...]) -> tuple[list[float], int | None, int]:
    from itertools import accumulate

    from slimpipe.schedule import builders
    from slimpipe.schedule.actions import Action, Kind

    w, g = builder_warmup(name, p, m, n, v)
    fwd, bwd = builders._orders(0, p, m, n, v, g)
    total = len(fwd)
    if w is None:
        return [float(n * m * v)] * p, None, g  # GPipe: everything in flight (Σ n·w_j = n per micro-batch)
    pf = [0.0, *accumulate(n * weights[a.seq_slice] for a in fwd)]  # pf[i] = Σ weights of F₀…F_{i−1}
    pb = [0.0, *accumulate(n * weights[a.seq_slice] for a in bwd)]
    first = bwd[0]
    dep = fwd.index(Action(first.stage, Kind.F, first.microbatch, first.seq_slice))
    peaks = []
    for r in range(p):
        target = min(total, dep + 1 + w * (p - 1 - r))
        best = pf[target]
        for k in range(total - target):  # after F_{target+k}, before B_{k+1}
            best = max(best, pf[target + k + 1] - pb[k + 1])
        peaks.append(best)
    return peaks, w, g
