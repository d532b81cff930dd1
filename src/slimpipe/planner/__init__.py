"""`slimpipe plan`: enumerate parallel layouts, drop what does not fit, simulate the rest, rank them.

Imports no torch. Letters follow the SlimPipe reference (§1). Three passes keep a full plan fast:

1. **Enumerate** (`space`: schedule, t, c, p, d, e, n, v, vocab-parallel, exchange): t a divisor of the
   node size dividing both head counts, c a power of two, p dividing L, v with l = L/(p·v) ≥ 1 an integer
   (v > 1 only for interleaved-1f1b and slimpipe), d = G/(t·c·p), B = T/s sequences with m = B/d ≥ 1,
   n = 1 for unsliced schedules and a multiple of p up to 8p for sliced ones, s/n divisible by t (and by
   2c·t with CP); the attention context exchange off, and on for slimpipe with n > 1 and p > 1.
2. **Closed-form memory pre-check** (no schedule built): every builder runs the same warm-up rule, so rank
   r's peak in-flight units is min(m·n·v, f₀ + 1 + w·(p−1−r)) with f₀ the forward position of the first
   backward's unit (`slimpipe.sim.evaluate.precheck_memory`, equal to the built schedules' by test); the
   published memory model (slimpipe.sim.memory) turns that into per-GPU bytes. Per layout only the
   cheapest recompute mode (none → partial+fc1 → full) with the smallest offload α that fits is kept:
   offload costs no time in the cost model and recomputation only adds time, so the others are dominated.
   The exchange variant shares the pre-check plus a bound of its buffers (one layer's request and reply).
   slimpipe layouts with n > 1 are tried with equal and with equal-FLOP slices (``--slice-split``); the
   exchange needs equal slices.
3. **Bound, estimate, simulate** (`bound`, `search`). A lower bound on the step time from the cost model
   (`step_time_bound`; `exchange_time_bound` with the exchange, which moves work between ranks). Candidates
   are simulated best-first with `slimpipe.sim.evaluate` (what `slimpipe simulate` runs, so both print
   the same numbers), ordered by the bound corrected with the simulated/bound ratio already seen for the
   same schedule shape; the search stops when no remaining estimate can enter the top K, or after
   ``max_simulations``. The bound of what was left says how much could be missed.
"""

from __future__ import annotations

from slimpipe.planner.bound import exchange_time_bound, peak_unit_bytes, step_time_bound
from slimpipe.planner.request import (
    EXCHANGE_SCHEDULES, HOST_LINK_BW, OFFLOAD_LADDER, RECOMPUTE_LADDER, SCHEDULES, Plan, PlanRequest,
    PlanResult, exchange_applies,
)
from slimpipe.planner.search import plan

__all__ = [
    "SCHEDULES", "RECOMPUTE_LADDER", "OFFLOAD_LADDER", "HOST_LINK_BW", "EXCHANGE_SCHEDULES", "PlanRequest",
    "Plan", "PlanResult", "plan", "step_time_bound", "exchange_time_bound", "exchange_applies",
    "peak_unit_bytes",
]
