"""One call from a workload and a schedule name to a simulated Report: build → lower → simulate → memory.

Used by `slimpipe simulate`/`plot` and by the planner, so all of them see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.schedule.actions import Schedule
from slimpipe.sim.cost import AnalyticCost, CostModel, UniformCost, seq1f1b_partition
from slimpipe.sim.hardware import Hardware
from slimpipe.sim.memory import MemoryBreakdown, memory_model
from slimpipe.sim.metrics import Report, summarize
from slimpipe.sim.simulator import DeadlockError, Timeline, simulate
from slimpipe.sim.workload import Workload

__all__ = ["Evaluation", "evaluate", "schedule_slice_weights", "COSTS"]

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


def schedule_slice_weights(workload: Workload, schedule_name: str, *,
                           equal_slices: bool = False) -> tuple[float, ...] | None:
    """The slice lengths ``evaluate`` builds with: None (equal slices) except for seq1f1b's equal-FLOP
    segments (boundaries rounded to t·2c tokens). Shared with the planner's memory pre-check."""
    from slimpipe.config import ConfigError

    par = workload.parallel
    if schedule_name != "seq1f1b" or par.slices == 1 or equal_slices:
        return None
    multiple = par.tp * (2 * par.cp if par.cp > 1 else 1)
    try:
        return seq1f1b_partition(workload.model, workload.seq_len, par.slices, multiple=multiple)
    except ValueError as exc:
        raise ConfigError(f"{exc}: use fewer --slices or a longer --seq-len") from None


def evaluate(workload: Workload, schedule_name: str, *, hardware: Hardware, cost: str = "analytic",
             warmup: str = "auto", equal_slices: bool = False) -> Evaluation:
    """Build the named schedule for ``workload``, lower it, simulate it and apply the memory model.

    seq1f1b gets Seq1F1B's computation-balanced segments (seq1f1b_partition, boundaries rounded to t·2c
    tokens) unless ``equal_slices``.
    """
    from slimpipe.config import ConfigError
    from slimpipe.schedule.builders import build
    from slimpipe.schedule.passes import lower

    if cost not in COSTS:
        raise ConfigError(f"--cost={cost!r} is unknown: use one of {', '.join(COSTS)}")
    par = workload.parallel
    weights = schedule_slice_weights(workload, schedule_name, equal_slices=equal_slices)
    built = build(schedule_name, p=par.pp, m=workload.microbatches, n=par.slices, v=par.vpp,
                  warmup=warmup, slice_weights=weights)
    sched = lower(built)
    model: CostModel = (UniformCost() if cost == "uniform"
                        else AnalyticCost(workload, hardware, sched.slice_fractions()))
    try:
        timeline = simulate(sched, model)
    except DeadlockError as exc:
        g = sched.meta.get("g")
        raise ConfigError(
            f"the {schedule_name} schedule for p={par.pp}, m={workload.microbatches}, n={par.slices}, "
            f"v={par.vpp} deadlocks ({str(exc).split('; ')[1]}): use m·n divisible by g={g} "
            "(the micro-batch/slice group size)"
        ) from None
    memory = tuple(memory_model(workload, built))  # compute-only: a third of the actions to scan
    report = summarize(workload, timeline, memory, hardware=None if cost == "uniform" else hardware,
                       dp_sync_s=model.step_overhead())
    return Evaluation(workload=workload, schedule=sched, cost=model, timeline=timeline, memory=memory,
                      report=report)
