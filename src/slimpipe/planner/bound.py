"""Lower bounds on the simulated step time, and the offload traffic check, from the cost model alone.

The planner ranks thousands of candidates by these before it simulates a few dozen; tests check each
bound stays below the simulated step.
"""

from __future__ import annotations

from slimpipe.schedule.actions import VOCAB_KINDS, Kind
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.evaluate import schedule_slice_weights
from slimpipe.sim.hardware import Hardware
from slimpipe.sim.workload import Workload

__all__ = ["step_time_bound", "exchange_time_bound", "layout_bounds", "peak_unit_bytes"]


def _cost(workload: Workload, name: str, hardware: Hardware, split: str = "auto") -> AnalyticCost:
    par = workload.parallel
    fractions = (schedule_slice_weights(workload, name, split)
                 or tuple(1 / par.slices for _ in range(par.slices)))
    return AnalyticCost(workload, hardware, fractions)


def _stage_busy(cost: AnalyticCost, stage: int) -> float:
    """F + B seconds of one micro-batch (all its slices) on one stage."""
    ct = cost.compute_time
    return sum(ct(Kind.F, stage, j) + ct(Kind.B, stage, j) for j in range(len(cost.tokens)))


def _vocab_busy(cost: AnalyticCost) -> float:
    """Per-rank compute of the lock-step vocabulary collectives per step (AnalyticCost.vocab_time); 0 without them."""
    wl = cost.workload
    if not (wl.vocab_parallel and hasattr(cost, "vocab_time")):
        return 0.0
    return wl.microbatches * sum(cost.vocab_time(k, j)[0] for k in VOCAB_KINDS for j in range(len(cost.tokens)))


def _busy(cost: AnalyticCost, rank: int) -> float:
    """Compute seconds of one rank per step: its F and B of every (virtual stage, micro-batch, slice), and
    with the vocabulary in PP the compute part of its vocabulary collectives."""
    wl = cost.workload
    p = wl.parallel.pp
    return wl.microbatches * sum(_stage_busy(cost, k * p + rank) for k in range(wl.parallel.vpp)) \
        + _vocab_busy(cost)


def _head_tail(cost: AnalyticCost, rank: int) -> tuple[float, float]:
    """(earliest start, latest drain) of a rank: slice 0 of micro-batch 0 must cross stages 0…rank−1
    before the rank's first F, and its last B (slice 0 of the last micro-batch, virtual stage 0) must
    travel back through ranks rank−1…0."""
    ct, xt = cost.compute_time, cost.transfer_time
    head = sum(ct(Kind.F, s, 0) + xt(Kind.SEND_F, s, 0) for s in range(rank))
    tail = sum(ct(Kind.B, s, 0) + xt(Kind.SEND_B, s + 1, 0) for s in range(rank))
    return head, tail


def step_time_bound(workload: Workload, name: str, hardware: Hardware,
                    split: str = "auto") -> tuple[float, float]:
    """(lower bound on the simulated step time, busy seconds of the last rank), from the cost model.

    Valid for every builder: each rank's first compute is F(stage r, micro-batch 0, slice 0) and its last
    is B(stage r, micro-batch m−1, slice 0), both at virtual stage 0 (see slimpipe.schedule.builders), so
    the last rank needs head + its busy time + tail. The vocabulary collectives' communication is left out
    (it may overlap other ranks' work), which keeps the bound a bound. Without the exchange only.
    """
    bound, busy, _ = layout_bounds(workload, name, hardware, exchange=False, split=split)
    return bound, busy


def exchange_time_bound(workload: Workload, name: str, hardware: Hardware) -> float:
    """Lower bound on the simulated step time with the attention context exchange on.

    The exchange moves attention between ranks, so no single rank's busy time is known in advance; but it
    only moves or adds work (helper + Δ, owner ≥ base − Δ, plus exposed transfers and rendezvous waits,
    sim/exchange.py), so the ranks' total busy time is at least the unexchanged total. Each rank r still
    needs head_r + busy_r + tail_r (slice 0 is never an owner, so the head/tail chains only lengthen), and
    the step is at least the mean of that over the ranks. Every stage but the first and the last holds only
    transformer layers (the embedding is on stage 0, the head on the last stage, or both in the vocabulary
    collectives every rank runs), so one such stage is costed for all of them.
    """
    return layout_bounds(workload, name, hardware, exchange=True)[2]


def layout_bounds(workload: Workload, name: str, hardware: Hardware, *, exchange: bool,
                  split: str = "auto") -> tuple[float, float, float]:
    """(step_time_bound, the last rank's busy seconds, exchange_time_bound or nan unless ``exchange``),
    sharing one cost model (its per-(stage, slice) durations are cached); ``split`` is the slice split
    (SLICE_SPLITS)."""
    cost = _cost(workload, name, hardware, split)
    p = workload.parallel.pp
    last = _busy(cost, p - 1)
    head, tail = _head_tail(cost, p - 1)
    overhead = cost.step_overhead()
    if not exchange:
        return head + last + tail + overhead, last, float("nan")
    v, m = workload.parallel.vpp, workload.microbatches
    middle = (p - 1) * v - 1  # stages on ranks 0…p−2 besides stage 0: layers only, all alike
    total = last + (p - 1) * _vocab_busy(cost)
    if p > 1:
        total += m * (_stage_busy(cost, 0) + (middle * _stage_busy(cost, 1) if middle else 0.0))
    ct, xt = cost.compute_time, cost.transfer_time
    # Σ_r (head_r + tail_r): stage s's slice-0 F, B and sends lie on the chains of ranks s+1…p−1.
    chains = sum((p - 1 - s) * (ct(Kind.F, s, 0) + xt(Kind.SEND_F, s, 0) + ct(Kind.B, s, 0)
                                + xt(Kind.SEND_B, s + 1, 0)) for s in range(p - 1))
    return head + last + tail + overhead, last, (chains + total) / p + overhead


def peak_unit_bytes(wl: Workload) -> float:
    """Saved-activation bytes of one equal-length unit on one GPU (offload traffic per unit)."""
    from slimpipe.sim.memory import activation_bytes_per_token, unit_bytes

    return unit_bytes(wl, activation_bytes_per_token(wl)[0], 1 / wl.parallel.slices)
