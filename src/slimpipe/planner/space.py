"""The search space of `slimpipe plan`: layouts, schedule shapes, and the memory pre-check per layout.

Yields every (schedule, workload, peak bytes) that passes divisibility, the builders' warm-up rule and the
closed-form memory pre-check, with the cheapest recompute mode and smallest offload α that fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from slimpipe.config import ConfigError, ParallelConfig
from slimpipe.planner.request import INTERLEAVED, SLICED, PlanRequest, exchange_applies, slice_splits
from slimpipe.rules import expert_problem, sequence_problem, tp_problem
from slimpipe.sim.evaluate import builder_warmup, precheck_memory
from slimpipe.sim.exchange import exchange_buffer_bound
from slimpipe.sim.workload import Workload

__all__ = ["layouts", "shapes", "candidates"]


def _divisors(x: int) -> list[int]:
    return [k for k in range(1, x + 1) if x % k == 0]


def layouts(req: PlanRequest) -> Iterator[tuple[int, int, int, int, int]]:
    """(t, c, p, d, e) with t·c·p·d = G, c a power of two, m = B/d ≥ 1 an integer."""
    mod, g, batch = req.model, req.gpus, req.global_batch
    node = req.hardware.gpus_per_node
    for t in _divisors(min(node, 8)):
        if g % t or tp_problem(mod, t):
            continue
        for p in _divisors(mod.num_layers):
            for d in _divisors(batch):
                if g % (t * p * d):
                    continue
                c = g // (t * p * d)
                if c & (c - 1):
                    continue
                # Megatron's default expert-TP = t: the expert group lies inside the c·d ranks.
                eps = [e for e in _divisors(mod.num_experts)
                       if expert_problem(mod, ParallelConfig(tp=t, cp=c, pp=p, dp=d, ep=e)) is None]
                for e in eps:
                    yield t, c, p, d, e


def shapes(name: str, req: PlanRequest, t: int, c: int, p: int) -> Iterator[tuple[int, int]]:
    """(n, v) for one schedule family on p ranks."""
    vs = [1]
    if name in INTERLEAVED and p > 1:  # interleaving one rank's layers with itself gains nothing
        vs = [v for v in _divisors(req.model.num_layers // p) if v > 1 or name == "slimpipe"]
    elif name == "interleaved-1f1b":
        vs = []
    ns = [k * p for k in range(1, 9) if k * p > 1] if name in SLICED else [1]
    for n in ns:
        if sequence_problem(req.seq_len, n, t, c):  # SP shards a slice over t; CP cuts it into 2c pieces
            continue
        for v in vs:
            yield n, v


def _fit_ladder(req: PlanRequest, name: str, par: ParallelConfig, vocab: bool, split: str,
                stats: Counter, low: list) -> Iterator[tuple[Workload, float]]:
    """(workload, peak bytes) for the cheapest recompute modes that fit, each with its smallest α."""
    hbm = req.hardware.hbm_bytes

    def peak_of(rec: str, alpha: float) -> tuple[Workload, float]:
        wl = Workload(model=req.model, parallel=par, seq_len=req.seq_len, global_batch=req.global_batch,
                      recompute=rec, offload=alpha, vocab_parallel=vocab, documents=req.documents)
        return wl, max(mb.peak for mb in precheck_memory(wl, name, split))

    lightest = min(peak_of(rec, req.offload[-1])[1] for rec in req.recompute)  # α only lowers the peak
    if lightest > hbm:  # nothing on the ladder fits: skip the rest of it
        stats["memory"] += 1
        low[0] = min(low[0], lightest)
        return
    for rec in req.recompute:
        for alpha in req.offload:
            wl, peak = peak_of(rec, alpha)
            if peak <= hbm:
                yield wl, peak
                if alpha == 0.0:
                    return  # slower recompute modes cannot beat a fit without offload
                break


def candidates(req: PlanRequest, stats: Counter,
               low: list) -> Iterator[tuple[str, Workload, float, bool, str]]:
    """Every (schedule, workload, peak, exchange, slice split) that passes divisibility, warm-up and the
    memory pre-check.

    The exchange variant of a layout shares its pre-check plus a bound of the exchange buffers
    (``exchange_buffer_bound``: one layer's request and reply), so a layout can fit without the exchange
    and not with it; the exchange needs equal slices. ``stats`` counts the layouts enumerated ("layouts")
    and why others were dropped; ``low[0]`` keeps the smallest peak among memory-rejected layouts.
    """
    batch, hbm = req.global_batch, req.hardware.hbm_bytes
    for t, c, p, d, e in layouts(req):
        m = batch // d
        for name in req.schedules:
            for n, v in shapes(name, req, t, c, p):
                try:
                    builder_warmup(name, p, m, n, v)
                except ConfigError:
                    stats["warm-up"] += 1
                    continue
                xs = [x for x in req.exchange if not x or exchange_applies(name, p, n)]
                if not xs:  # exchange required where it cannot run: skip before the pre-check
                    stats["exchange"] += len(req.vocab_parallel)
                    continue
                par = ParallelConfig(tp=t, cp=c, pp=p, dp=d, ep=e, slices=n, vpp=v)
                for vocab in req.vocab_parallel:
                    stats["layouts"] += 1
                    for split in slice_splits(name, n, req.slice_split):
                        for wl, peak in _fit_ladder(req, name, par, vocab, split, stats, low):
                            for x in (xs if split == "equal" else [x for x in xs if not x]):
                                extra = exchange_buffer_bound(wl) if x else 0.0
                                if peak + extra > hbm:
                                    stats["memory"] += 1
                                    continue
                                yield name, wl, peak + extra, x, split
