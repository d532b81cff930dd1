"""Bound every candidate, simulate them best-first, keep the top K (`plan`)."""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from slimpipe.config import ConfigError
from slimpipe.planner.bound import layout_bounds, peak_unit_bytes
from slimpipe.planner.request import HOST_LINK_BW, Plan, PlanRequest, PlanResult, exchange_applies
from slimpipe.planner.space import candidates
from slimpipe.sim.evaluate import evaluate
from slimpipe.sim.memory import GIB
from slimpipe.sim.workload import Workload

__all__ = ["plan"]

_EXCHANGE_FLOOR = ("exchange",)
"""Key of the smallest simulated/bound ratio seen over all exchange shapes (the prior of unseen ones)."""


@dataclass(frozen=True, slots=True)
class _Candidate:
    bound_s: float
    peak: float
    schedule: str
    workload: Workload
    exchange: bool
    split: str

    @property
    def shape(self) -> tuple[str, int, int, int, int, bool, bool, str]:
        """What the bound/simulated ratio depends on: the schedule's shape and which rank is heaviest."""
        wl = self.workload
        par = wl.parallel
        return (self.schedule, par.pp, wl.microbatches, par.slices, par.vpp, wl.vocab_parallel, self.exchange,
                self.split)


def _offload_hidden(wl: Workload, busy: float) -> bool:
    """Whether every unit's offloaded bytes can move out after its F and back before its B within the
    rank's busy time at HOST_LINK_BW."""
    par = wl.parallel
    units = wl.microbatches * par.slices * par.vpp
    moved = 2 * wl.offload * peak_unit_bytes(wl) * units
    return moved / HOST_LINK_BW <= busy


Progress = Callable[[str], None]
"""Receives one-line status messages while `plan` works (the CLI draws them on stderr)."""


def _silent(_message: str) -> None:
    pass


def _bounded(req: PlanRequest, stats: Counter, low: list,
             progress: Progress = _silent) -> list[_Candidate]:
    """Candidates with their step-time bound, dropping offload whose host traffic cannot be hidden."""
    out = []
    twins = True in req.exchange
    last: tuple = (None, "", 0.0, 0.0, 0.0)  # (workload, split, bounds): an exchange twin follows its layout
    for name, wl, peak, exchange, split in candidates(req, stats, low):
        if last[0] is not wl or last[1] != split:
            with_exchange = twins and split == "equal" and exchange_applies(name, wl.parallel.pp,
                                                                            wl.parallel.slices)
            last = (wl, split, *layout_bounds(wl, name, req.hardware, exchange=with_exchange, split=split))
        _, _, bound, busy, bound_x = last
        if wl.offload and not _offload_hidden(wl, busy):
            stats["offload bandwidth"] += 1
            continue
        out.append(_Candidate(bound_x if exchange else bound, peak, name, wl, exchange, split))
        if len(out) % 64 == 0:
            progress(f"memory pre-check: {stats['layouts']} layouts, {len(out)} candidates fit")
    return out


def _to_plan(cand: _Candidate, ev, hbm: float) -> Plan:
    wl, rep = ev.workload, ev.report
    par, peak = wl.parallel, rep.memory[rep.peak_rank].peak
    return Plan(schedule=cand.schedule, tp=par.tp, cp=par.cp, pp=par.pp, dp=par.dp, ep=par.ep,
                slices=par.slices, vpp=par.vpp, microbatches=wl.microbatches, recompute=wl.recompute,
                offload=wl.offload, vocab_parallel=wl.vocab_parallel, exchange=cand.exchange,
                slice_split=cand.split,
                step_time_s=rep.step_time_s, tokens_per_s=rep.tokens_per_s, mfu=rep.mfu,
                mfu_dense=rep.mfu_dense, bubble_ratio=rep.bubble_ratio, peak_memory_gib=peak / GIB,
                headroom_gib=(hbm - peak) / GIB)


def _simulate(req: PlanRequest, cand: _Candidate, stats: Counter) -> tuple[Plan, float] | None:
    """(plan, simulated/bound ratio), or None when the schedule or its exact memory rules it out."""
    try:
        ev = evaluate(cand.workload, cand.schedule, hardware=req.hardware, slice_split=cand.split,
                      attn_balance=cand.workload.parallel.slices if cand.exchange else 0)  # unclipped
    except ConfigError:
        stats["schedule"] += 1
        return None
    found = _to_plan(cand, ev, req.hardware.hbm_bytes)
    if found.headroom_gib < 0:  # the pre-check and the built schedule disagree: trust the latter
        stats["memory"] += 1
        return None
    return found, ev.report.step_time_s / cand.bound_s


def _estimate(tokens: int, cand: _Candidate, gaps: dict[tuple, float]) -> float:
    """Tokens/s estimate: the bound over the smallest simulated/bound ratio seen for the same shape, else
    the same shape with any m, else (exchange only) any exchange shape, else 1 (the bound itself)."""
    shape = cand.shape
    coarse = shape[:2] + shape[3:]  # without m: a smaller m only adds fill time, which the bound has
    prior = gaps.get(_EXCHANGE_FLOOR, 1.0) if cand.exchange else 1.0
    return tokens / cand.bound_s / gaps.get(shape, gaps.get(coarse, prior))


def _search(req: PlanRequest, cands: list[_Candidate], stats: Counter,
            progress: Progress = _silent) -> tuple[list[Plan], int, list[int], bool]:
    """Best-first simulation: (top plans, simulations run, candidates left unsimulated, whether
    max_simulations stopped it).

    The ratio of a shape is mostly the slice imbalance the bound cannot see, and it barely depends on t, c,
    recompute or α (within 0.2 % on Llama-70B at 512K). With the exchange it is mostly the rendezvous
    waits instead; an exchange shape never simulated borrows the smallest ratio of any simulated exchange
    shape, so one exchange simulation stops the rest from looking as good as their bound. Ratios only fall
    as shapes are simulated (min), which raises estimates, so the queue is rebuilt after each simulation
    rather than corrected lazily. Stops when the best remaining estimate cannot enter the top K, or after
    max_simulations.
    """
    tokens = req.global_batch * req.seq_len
    gaps: dict[tuple, float] = {}
    queue = [(-tokens / c.bound_s, i) for i, c in enumerate(cands)]
    heapq.heapify(queue)
    best: list[tuple[float, int, Plan]] = []  # min-heap of the K best (tokens/s, tiebreak, plan)
    simulated, capped = 0, False
    while queue:
        neg, i = queue[0]
        if len(best) >= req.top and -neg <= best[0][0]:
            break
        if simulated >= req.max_simulations:
            capped = True
            break
        heapq.heappop(queue)
        cand = cands[i]
        lead = f", best so far {max(x[0] for x in best):,.0f} tokens/s" if best else ""
        par = cand.workload.parallel
        progress(f"simulating {simulated + 1}/{min(req.max_simulations, len(cands))} best-first: "
                 f"{cand.schedule} p{par.pp} n{par.slices} v{par.vpp}{lead}")
        simulated += 1
        stats["simulated exchange"] += cand.exchange
        done = _simulate(req, cand, stats)
        if done is None:
            continue
        found, ratio = done
        shape = cand.shape
        keys = [shape, shape[:2] + shape[3:]] + ([_EXCHANGE_FLOOR] if cand.exchange else [])
        if any(ratio < gaps.get(key, float("inf")) for key in keys):
            for key in keys:
                gaps[key] = min(gaps.get(key, float("inf")), ratio)
            queue = [(-_estimate(tokens, cands[j], gaps), j) for _, j in queue]
            heapq.heapify(queue)
        item = (found.tokens_per_s, -i, found)
        if len(best) < req.top:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    plans = sorted((x[2] for x in best), key=lambda p: (-p.tokens_per_s, p.peak_memory_gib))
    return plans, simulated, [i for _, i in queue], capped


def plan(req: PlanRequest, *, progress: Progress | None = None) -> PlanResult:
    """Enumerate, pre-check memory, bound, simulate best-first; best plans first. ``progress`` (optional)
    receives status lines as the search goes (`slimpipe plan` shows them on a terminal's stderr)."""
    t0 = time.perf_counter()
    say = progress or _silent
    stats: Counter = Counter()
    low = [float("inf")]
    cands = _bounded(req, stats, low, say)
    plans, simulated, left, capped = _search(req, cands, stats, say)
    tokens = req.global_batch * req.seq_len
    layouts = stats.pop("layouts", 0)
    simulated_exchange = stats.pop("simulated exchange", 0)
    return PlanResult(
        plans=tuple(plans), layouts=layouts, rejected={k: v for k, v in stats.items() if v},
        candidates=len(cands), exchange_candidates=sum(c.exchange for c in cands), simulated=simulated,
        simulated_exchange=simulated_exchange, not_simulated=len(left), capped=capped,
        best_unsimulated_tps=max((tokens / cands[i].bound_s for i in left), default=None),
        smallest_rejected_peak_gib=None if low[0] == float("inf") else low[0] / GIB,
        wall_s=time.perf_counter() - t0,
    )
