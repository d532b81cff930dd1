"""`slimpipe plan`: enumerate parallel layouts, drop what does not fit, simulate the rest, rank them.

Imports no torch. Letters follow the SlimPipe reference (§1). Three passes keep a full plan fast:

1. **Enumerate** (schedule, t, c, p, d, e, n, v, vocab-parallel): t a divisor of the node size dividing
   both head counts, c a power of two, p dividing L, v with l = L/(p·v) ≥ 1 an integer (v > 1 only for
   interleaved-1f1b and slimpipe), d = G/(t·c·p), B = T/s sequences with m = B/d ≥ 1, n = 1 for unsliced
   schedules and a multiple of p up to 8p for sliced ones, s/n divisible by t (and by 2c·t with CP).
2. **Closed-form memory pre-check** (no schedule built): every builder runs the same warm-up rule, so rank
   r's peak in-flight units is min(m·n·v, f₀ + 1 + w·(p−1−r)) with f₀ the forward position of the first
   backward's unit (`slimpipe.sim.evaluate.precheck_memory`, equal to the built schedules' by test); the
   published memory model (slimpipe.sim.memory) turns that into per-GPU bytes. Per layout only the
   cheapest recompute mode (none → partial+fc1 → full) with the smallest offload α that fits is kept:
   offload costs no time in the cost model and recomputation only adds time, so the others are dominated.
3. **Bound, estimate, simulate.** A lower bound on the step time from the cost model (`step_time_bound`):
   the last rank cannot start before slice 0 has crossed stages 0…p−2, works its whole busy time, and its
   last backward (slice 0 of the last micro-batch, virtual stage 0) must still travel back through ranks
   p−2…0. Candidates are simulated best-first with `slimpipe.sim.evaluate` (what `slimpipe simulate`
   runs, so both print the same numbers), ordered by the bound corrected with the simulated/bound ratio
   already seen for the same schedule shape (`_search`); the search stops when no remaining estimate can
   enter the top K, or after ``max_simulations``. The bound of what was left says how much could be missed.

Attention context exchange (§8) is not modelled by the simulator yet: every plan has ``exchange=False``.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig
from slimpipe.schedule.actions import VOCAB_KINDS, Kind
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.evaluate import builder_warmup, evaluate, precheck_memory, schedule_slice_weights
from slimpipe.sim.hardware import Hardware
from slimpipe.sim.memory import GIB
from slimpipe.sim.workload import Workload

__all__ = [
    "SCHEDULES", "RECOMPUTE_LADDER", "OFFLOAD_LADDER", "HOST_LINK_BW", "PlanRequest", "Plan", "PlanResult",
    "plan", "step_time_bound",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "seq1f1b", "slimpipe")
RECOMPUTE_LADDER = ("none", "partial+fc1", "full")
"""Recompute modes tried per layout, cheapest (in time) first."""
OFFLOAD_LADDER = (0.0, 0.5, 0.75)
"""Offload fractions α tried per recompute mode, smallest first."""
HOST_LINK_BW = 25e9
"""Assumed achievable GPU↔host bandwidth per GPU and direction (PCIe Gen5 x16, shared), bytes/s: offload
is kept only if moving every unit's offloaded bytes out and back fits in the rank's busy time."""
SLICED = ("seq1f1b", "slimpipe")
INTERLEAVED = ("interleaved-1f1b", "slimpipe")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRequest:
    """What to plan for, and how wide to search."""

    model: ModelConfig
    """The transformer."""
    seq_len: int
    """s: tokens per sequence."""
    gpus: int
    """G = t·c·p·d."""
    hardware: Hardware
    """GPU type (HBM is the memory limit; FLOP/s and links drive the cost model)."""
    schedules: tuple[str, ...] = SCHEDULES
    """Schedule families to enumerate."""
    global_batch_tokens: int = 4 << 20
    """T: tokens per optimizer step (4 Mi as in the paper); B = T/s."""
    top: int = 10
    """K: plans to return."""
    max_simulations: int = 32
    """Cap on full simulations; beyond it the remaining candidates are reported as not simulated."""
    recompute: tuple[str, ...] = RECOMPUTE_LADDER
    """Recompute modes to try, in order of increasing time cost."""
    offload: tuple[float, ...] = OFFLOAD_LADDER
    """Offload fractions α to try, in increasing order."""
    vocab_parallel: tuple[bool, ...] = (False, True)
    """Vocabulary placements to try (True: embedding/output sharded over t·p, SlimPipe §9)."""

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            raise ConfigError(f"--gpus={self.gpus!r} must be a positive integer (the GPU count G = t·c·p·d)")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"--seq-len={self.seq_len!r} must be a positive integer")
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise ConfigError(f"--schedule {bad or ''} is unknown: use one of {', '.join(SCHEDULES)} or all")
        t = self.global_batch_tokens
        if not isinstance(t, int) or t < self.seq_len or t % self.seq_len:
            raise ConfigError(
                f"--global-batch-tokens={t!r} must be a positive multiple of --seq-len={self.seq_len} "
                f"(B = T/s sequences): use e.g. {max(1, (t or 0) // self.seq_len) * self.seq_len}"
            )
        for name in ("top", "max_simulations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be ≥ 1")

    @property
    def global_batch(self) -> int:
        """B = T/s."""
        return self.global_batch_tokens // self.seq_len


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """One simulated configuration (numbers identical to `slimpipe simulate` with the same flags)."""

    schedule: str
    """Builder name."""
    tp: int
    """t."""
    cp: int
    """c."""
    pp: int
    """p."""
    dp: int
    """d."""
    ep: int
    """e."""
    slices: int
    """n."""
    vpp: int
    """v."""
    microbatches: int
    """m = B/d."""
    recompute: str
    """Recompute mode."""
    offload: float
    """α."""
    vocab_parallel: bool
    """Vocabulary layers sharded over t·p."""
    exchange: bool = False
    """Attention context exchange (§8): not modelled yet, always off."""
    step_time_s: float
    """Simulated step time (pipeline + DP sync)."""
    tokens_per_s: float
    """Global tokens per second."""
    mfu: float
    """MFU, 6N + 12·L·H·Q·T convention."""
    mfu_causal: float
    """MFU, causal 6N + 6·L·H·Q·T convention."""
    bubble_ratio: float
    """Idle fraction of pipeline rank-time."""
    peak_memory_gib: float
    """Highest per-GPU peak, GiB."""
    headroom_gib: float
    """HBM minus peak, GiB."""

    def layout(self) -> str:
        """``t4 c2 p16 d1 e1 n16 v5`` as in `slimpipe simulate`'s header."""
        return (f"t{self.tp} c{self.cp} p{self.pp} d{self.dp} e{self.ep} n{self.slices} v{self.vpp}")

    def simulate_flags(self) -> str:
        """The `slimpipe simulate` flags that reproduce this plan (model, seq-len, batch and GPU added)."""
        flags = (f"--schedule {self.schedule} --tp {self.tp} --cp {self.cp} --pp {self.pp} --dp {self.dp} "
                 f"--ep {self.ep} --slices {self.slices} --vpp {self.vpp} --recompute {self.recompute}")
        if self.offload:
            flags += f" --offload {self.offload:g}"
        return flags + (" --vocab-parallel" if self.vocab_parallel else "")

    def to_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    """Ranked plans and what the search did to find them."""

    plans: tuple[Plan, ...]
    """Best first (tokens/s, then lower peak memory)."""
    layouts: int
    """Structural configurations enumerated (before the memory pre-check)."""
    rejected: dict[str, int]
    """Why configurations were dropped: divisibility, warm-up, memory, offload bandwidth, schedule."""
    candidates: int
    """Configurations that passed the memory pre-check."""
    simulated: int
    """Full simulations run."""
    not_simulated: int
    """Candidates never simulated (their estimate could not enter the top K, or max_simulations)."""
    capped: bool
    """True when max_simulations, not the estimates, ended the search."""
    best_unsimulated_tps: float | None
    """Upper bound (from the step-time bound) on the tokens/s of any candidate left unsimulated."""
    smallest_rejected_peak_gib: float | None
    """Lowest peak among memory-rejected configurations (for the error message)."""
    wall_s: float
    """Seconds the search took."""

    @property
    def headroom_unsimulated(self) -> float:
        """How much faster than the best plan an unsimulated candidate could be at most (its bound), as a
        fraction; ≤ 0 means the best plan is provably the best of all candidates."""
        if self.best_unsimulated_tps is None or not self.plans:
            return 0.0
        return self.best_unsimulated_tps / self.plans[0].tokens_per_s - 1


def _divisors(x: int) -> list[int]:
    return [k for k in range(1, x + 1) if x % k == 0]


def _layouts(req: PlanRequest) -> Iterator[tuple[int, int, int, int, int]]:
    """(t, c, p, d, e) with t·c·p·d = G, c a power of two, m = B/d ≥ 1 an integer."""
    mod, g, batch = req.model, req.gpus, req.global_batch
    node = req.hardware.gpus_per_node
    for t in _divisors(min(node, 8)):
        if g % t or mod.num_heads % t or mod.num_kv_heads % t:
            continue
        for p in _divisors(mod.num_layers):
            for d in _divisors(batch):
                if g % (t * p * d):
                    continue
                c = g // (t * p * d)
                if c & (c - 1):
                    continue
                eps = [e for e in _divisors(mod.num_experts) if (t * c * d) % e == 0]
                for e in eps if mod.num_experts > 1 else [1]:
                    yield t, c, p, d, e


def _shapes(name: str, req: PlanRequest, t: int, c: int, p: int) -> Iterator[tuple[int, int]]:
    """(n, v) for one schedule family on p ranks."""
    vs = [1]
    if name in INTERLEAVED and p > 1:  # interleaving one rank's layers with itself gains nothing
        vs = [v for v in _divisors(req.model.num_layers // p) if v > 1 or name == "slimpipe"]
    elif name == "interleaved-1f1b":
        vs = []
    ns = [k * p for k in range(1, 9) if k * p > 1] if name in SLICED else [1]
    shard = t * (2 * c if c > 1 else 1)  # SP shards a slice over t; CP cuts it into 2c zig-zag pieces
    for n in ns:
        if req.seq_len % n or (req.seq_len // n) % shard:
            continue
        for v in vs:
            yield n, v


def step_time_bound(workload: Workload, name: str, hardware: Hardware) -> tuple[float, float]:
    """(lower bound on the simulated step time, busy seconds of the last rank), from the cost model.

    Valid for every builder: each rank's first compute is F(stage r, micro-batch 0, slice 0) and its last
    is B(stage r, micro-batch m−1, slice 0), both at virtual stage 0 (see slimpipe.schedule.builders).
    With the vocabulary in PP every rank also takes part in one embedding, head and embedding-gradient
    collective per (micro-batch, slice) (sim/vocab.py); their compute counts as busy time, their
    communication is left out (it may overlap other ranks' work), which keeps the bound a bound.
    """
    par = workload.parallel
    p, v, m = par.pp, par.vpp, workload.microbatches
    fractions = schedule_slice_weights(workload, name) or tuple(1 / par.slices for _ in range(par.slices))
    cost = AnalyticCost(workload, hardware, fractions)
    ct, xt, r = cost.compute_time, cost.transfer_time, p - 1
    slices = range(len(fractions))
    busy = m * sum(ct(Kind.F, k * p + r, j) + ct(Kind.B, k * p + r, j) for k in range(v) for j in slices)
    if workload.vocab_parallel and hasattr(cost, "vocab_time"):
        busy += m * sum(cost.vocab_time(k, j)[0] for k in VOCAB_KINDS for j in slices)
    head = sum(ct(Kind.F, s, 0) + xt(Kind.SEND_F, s, 0) for s in range(r))
    tail = sum(ct(Kind.B, s, 0) + xt(Kind.SEND_B, s + 1, 0) for s in range(r))
    return head + busy + tail + cost.step_overhead(), busy


@dataclass(frozen=True, slots=True)
class _Candidate:
    bound_s: float
    peak: float
    schedule: str
    workload: Workload

    @property
    def shape(self) -> tuple[str, int, int, int, int, bool]:
        """What the bound/simulated ratio depends on: the schedule's shape and which rank is heaviest."""
        wl = self.workload
        par = wl.parallel
        return self.schedule, par.pp, wl.microbatches, par.slices, par.vpp, wl.vocab_parallel


def _fit_ladder(req: PlanRequest, name: str, par: ParallelConfig, vocab: bool,
                stats: Counter, low: list) -> Iterator[tuple[Workload, float]]:
    """(workload, peak bytes) for the cheapest recompute modes that fit, each with its smallest α."""
    hbm = req.hardware.hbm_bytes

    def peak_of(rec: str, alpha: float) -> tuple[Workload, float]:
        wl = Workload(model=req.model, parallel=par, seq_len=req.seq_len, global_batch=req.global_batch,
                      recompute=rec, offload=alpha, vocab_parallel=vocab)
        return wl, max(mb.peak for mb in precheck_memory(wl, name))

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


def _candidates(req: PlanRequest, stats: Counter, low: list) -> Iterator[tuple[str, Workload, float]]:
    """Every (schedule, workload, peak) that passes divisibility, warm-up and the memory pre-check."""
    batch = req.global_batch
    for t, c, p, d, e in _layouts(req):
        m = batch // d
        for name in req.schedules:
            for n, v in _shapes(name, req, t, c, p):
                try:
                    builder_warmup(name, p, m, n, v)
                except ConfigError:
                    stats["warm-up"] += 1
                    continue
                par = ParallelConfig(tp=t, cp=c, pp=p, dp=d, ep=e, slices=n, vpp=v)
                for vocab in req.vocab_parallel:
                    stats["layouts"] += 1
                    for wl, peak in _fit_ladder(req, name, par, vocab, stats, low):
                        yield name, wl, peak


def _to_plan(name: str, ev, hbm: float) -> Plan:
    wl, rep = ev.workload, ev.report
    par, peak = wl.parallel, rep.memory[rep.peak_rank].peak
    return Plan(schedule=name, tp=par.tp, cp=par.cp, pp=par.pp, dp=par.dp, ep=par.ep, slices=par.slices,
                vpp=par.vpp, microbatches=wl.microbatches, recompute=wl.recompute, offload=wl.offload,
                vocab_parallel=wl.vocab_parallel, step_time_s=rep.step_time_s, tokens_per_s=rep.tokens_per_s,
                mfu=rep.mfu, mfu_causal=rep.mfu_causal, bubble_ratio=rep.bubble_ratio,
                peak_memory_gib=peak / GIB, headroom_gib=(hbm - peak) / GIB)


def _bounded(req: PlanRequest, stats: Counter, low: list) -> list[_Candidate]:
    """Candidates with their step-time bound, dropping offload whose host traffic cannot be hidden."""
    out = []
    for name, wl, peak in _candidates(req, stats, low):
        bound, busy = step_time_bound(wl, name, req.hardware)
        if wl.offload:
            par = wl.parallel
            units = wl.microbatches * par.slices * par.vpp
            moved = 2 * wl.offload * peak_unit_bytes(wl) * units  # out after F, back before B
            if moved / HOST_LINK_BW > busy:
                stats["offload bandwidth"] += 1
                continue
        out.append(_Candidate(bound, peak, name, wl))
    return out


def peak_unit_bytes(wl: Workload) -> float:
    """Saved-activation bytes of one equal-length unit on one GPU (offload traffic per unit)."""
    from slimpipe.sim.memory import activation_bytes_per_token, unit_bytes

    return unit_bytes(wl, activation_bytes_per_token(wl)[0], 1 / wl.parallel.slices)


def _search(req: PlanRequest, cands: list[_Candidate],
            stats: Counter) -> tuple[list[Plan], int, list[int], bool]:
    """Best-first simulation: (top plans, simulations run, candidates left unsimulated, whether
    max_simulations stopped it).

    A candidate's estimate is its bound divided by the smallest simulated/bound ratio seen so far for the
    same shape (name, p, m, n, v, vocabulary placement), or, before that shape was simulated, for the same
    shape with any m: that ratio is mostly the slice imbalance the bound cannot see, and it barely depends
    on t, c, recompute or α (within 0.2 % on Llama-70B at 512K). Stops when the best remaining estimate
    cannot enter the top K, or after max_simulations.
    """
    tokens = req.global_batch * req.seq_len
    gaps: dict[tuple, float] = {}
    queue = [(-tokens / c.bound_s, i) for i, c in enumerate(cands)]
    heapq.heapify(queue)
    best: list[tuple[float, int, Plan]] = []  # min-heap of the K best (tokens/s, tiebreak, plan)
    simulated, capped = 0, False
    while queue:
        neg, i = queue[0]
        cand = cands[i]
        shape = cand.shape
        coarse = shape[:2] + shape[3:]  # without m: a smaller m only adds fill time, which the bound has
        est = tokens / cand.bound_s / gaps.get(shape, gaps.get(coarse, 1.0))
        if est < -neg * (1 - 1e-9):  # the shape's ratio became known: re-queue with the estimate
            heapq.heapreplace(queue, (-est, i))
            continue
        if len(best) >= req.top and est <= best[0][0]:
            break
        if simulated >= req.max_simulations:
            capped = True
            break
        heapq.heappop(queue)
        simulated += 1
        try:
            ev = evaluate(cand.workload, cand.schedule, hardware=req.hardware)
        except ConfigError:
            stats["schedule"] += 1
            continue
        found = _to_plan(cand.schedule, ev, req.hardware.hbm_bytes)
        if found.headroom_gib < 0:  # the pre-check and the built schedule disagree: trust the latter
            stats["memory"] += 1
            continue
        ratio = ev.report.step_time_s / cand.bound_s
        for key in (shape, coarse):
            gaps[key] = min(gaps.get(key, float("inf")), ratio)
        item = (found.tokens_per_s, -i, found)
        if len(best) < req.top:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    plans = sorted((x[2] for x in best), key=lambda p: (-p.tokens_per_s, p.peak_memory_gib))
    return plans, simulated, [i for _, i in queue], capped


def plan(req: PlanRequest) -> PlanResult:
    """Enumerate, pre-check memory, bound, simulate best-first; best plans first."""
    t0 = time.perf_counter()
    stats: Counter = Counter()
    low = [float("inf")]
    cands = _bounded(req, stats, low)
    plans, simulated, left, capped = _search(req, cands, stats)
    tokens = req.global_batch * req.seq_len
    layouts = stats.pop("layouts", 0)
    return PlanResult(
        plans=tuple(plans), layouts=layouts, rejected=dict(stats), candidates=len(cands), simulated=simulated,
        not_simulated=len(left), capped=capped,
        best_unsimulated_tps=max((tokens / cands[i].bound_s for i in left), default=None),
        smallest_rejected_peak_gib=None if low[0] == float("inf") else low[0] / GIB,
        wall_s=time.perf_counter() - t0,
    )
