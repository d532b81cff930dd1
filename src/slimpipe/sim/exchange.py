"""The attention context exchange in the simulator: moved compute, exchange traffic, the rendezvous.

For each exchange of a marked schedule (slimpipe.schedule.exchange) the simulator

* starts the two paired units together: a marker is a rendezvous, the F (or B) after it starts when both
  ranks reached their markers (a rank that arrives first idles);
* moves Δ = the attention time of the owner's ``volume`` earliest prefix slices from the owner to the
  helper: helper = base + Δ; owner = max(base − Δ + exposed transfer, helper) because the owner merges the
  helper's per-layer replies, so it cannot finish before the helper does;
* charges the transfers: per layer the request (forward: q and the moved K/V; backward: dout, q, out, lse
  and the K/V) and the reply (forward: out and fp32 lse; backward: dq, dk, dv) over the pipeline link, with
  one p2p latency each way; they overlap the owner's local attention of the same layer, and only what
  does not fit is exposed (``exposed = Σ_layers max(0, transfer − local attention)``).

Volumes per CP rank follow SlimPipe §8: K/V ``|vol|·(s/n)/c · 2·(d_kv/t) · 2 B``, Q ``(s/n)/c · (h/t) · 2 B``,
out the same plus fp32 lse. With the uniform cost there is no attention model: only the rendezvous acts.
The same volumes size the memory model's ``exchange`` term (``exchange_buffers``): one layer's request
and reply, held at once on both ranks of the largest exchange a rank takes part in.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.schedule.actions import Kind, Schedule
from slimpipe.schedule.exchange import Exchange, exchanges
from slimpipe.sim.cost import AnalyticCost, CostModel
from slimpipe.sim.flops import ATTN_BWD_FACTOR
from slimpipe.sim.workload import Workload

__all__ = [
    "ExchangeTiming", "exchange_timing", "exchange_bytes", "moved_attention_time", "exchange_summary",
    "layer_exchange_bytes", "exchange_buffers", "exchange_buffer_bound",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ExchangeTiming:
    """What the simulator needs for a marked schedule."""

    durations: dict[tuple[int, int], float]
    """(rank, step) of an exchanged F/B -> its duration (replaces the cost model's)."""
    partner: dict[tuple[int, int], tuple[int, int]]
    """(rank, step) of a marker -> (rank, step) of its partner's marker (the rendezvous)."""
    moved_s: float
    """Attention compute moved from owners to helpers per step (seconds, all exchanges)."""
    bytes_per_step: float
    """Exchange traffic per step and pipeline (requests + replies, all layers, per GPU of a stage)."""


def _attention_layer_time(cost: AnalyticCost, kind: Kind, tokens: float, prefix: float) -> float:
    """Seconds of one layer's core attention (forward or backward) for ``tokens`` queries after ``prefix``."""
    wl, hw, par = cost.workload, cost.hw, cost.workload.parallel
    b = cost.b
    prof = hw.profile
    if prof is not None:
        q = wl.model.q_dim / par.tp
        att = prof.attn_fwd if kind is Kind.F else prof.attn_bwd
        scale = prof.compose_fwd if kind is Kind.F else prof.compose_bwd
        return scale * b * (att(q, tokens, prefix) - att.fixed_s) / par.cp
    flops = 4 * wl.model.q_dim * (tokens * prefix + tokens * tokens / 2) * b / (par.tp * par.cp)
    factor = 1.0 if kind is Kind.F else ATTN_BWD_FACTOR
    return factor * flops / (hw.peak_flops * hw.attention_efficiency)


def moved_attention_time(cost: AnalyticCost, x: Exchange) -> tuple[float, float]:
    """(Δ moved to the helper, the owner's remaining local attention), per stage (all its layers)."""
    j = x.owner.seq_slice
    tokens, prefix = cost.tokens[j], cost.prefix[j]
    moved_tokens = cost.prefix[x.volume]  # the earliest `volume` slices
    whole = _attention_layer_time(cost, x.owner.kind, tokens, prefix)
    local = _attention_layer_time(cost, x.owner.kind, tokens, prefix - moved_tokens)
    layers = cost.workload.layers_per_stage
    return layers * (whole - local), layers * local


def exchange_bytes(cost: AnalyticCost, x: Exchange) -> tuple[float, float]:
    """(request, reply) bytes of one layer of exchange ``x`` per GPU (activation dtype, fp32 lse)."""
    size = 2 if cost.hw.profile is None else cost.hw.profile.dtype_bytes
    return layer_exchange_bytes(cost.workload, cost.tokens[x.owner.seq_slice], cost.prefix[x.volume],
                                x.owner.kind, size)


def layer_exchange_bytes(wl: Workload, rows: float, moved: float, kind: Kind,
                         size: int = 2) -> tuple[float, float]:
    """(request, reply) bytes per GPU of one layer's exchange: the owner's ``rows`` query tokens of one
    sequence and ``moved`` prefix tokens of K/V (before b, CP and TP sharding)."""
    m, par = wl.model, wl.parallel
    t, c, b = par.tp, par.cp, par.micro_batch
    rows = b * rows / c  # the owner's query tokens per CP rank
    q = rows * m.q_dim / t * size
    lse = rows * m.num_heads / t * 4
    kv = b * moved / c * 2 * m.kv_dim / t * size
    if kind is Kind.F:
        return q + kv, q + lse  # (q, K/V) -> (out, lse)
    return 3 * q + kv + lse, q + kv  # (dout, q, out, K/V, lse) -> (dq, dK, dV)


def exchange_buffers(wl: Workload, schedule: Schedule) -> list[float]:
    """Per pipeline rank: bytes per GPU of the largest exchange it takes part in, request and reply of one
    layer held at once (both sides hold both: the owner its sent copies and the reply, the helper the
    request and its answer); bf16. A transient on top of the peak: it lives inside one layer of one unit."""
    s = wl.seq_len
    fractions = schedule.slice_fractions()
    prefix = [s * sum(fractions[:j]) for j in range(len(fractions) + 1)]
    out = [0.0] * schedule.num_ranks
    for x in exchanges(schedule):
        both = sum(layer_exchange_bytes(wl, s * fractions[x.owner.seq_slice], prefix[x.volume], x.owner.kind))
        for r in (x.owner_rank, x.helper_rank):
            out[r] = max(out[r], both)
    return out


def exchange_buffer_bound(wl: Workload) -> float:
    """An upper bound of ``max(exchange_buffers(...))`` without pairing: a backward exchange of one equal
    slice's queries moving the most an unclipped exchange can, (n−1)//2 slices of K/V."""
    n = wl.parallel.slices
    return sum(layer_exchange_bytes(wl, wl.seq_len / n, wl.seq_len / n * ((n - 1) // 2), Kind.B))


def exchange_timing(schedule: Schedule, cost: CostModel) -> ExchangeTiming:
    """Durations of the exchanged units and the marker rendezvous of a marked, lowered schedule."""
    partner: dict[tuple[int, int], tuple[int, int]] = {}
    durations: dict[tuple[int, int], float] = {}
    moved = traffic = 0.0
    analytic = isinstance(cost, AnalyticCost)
    for x in exchanges(schedule):
        so, sh = x.owner_step, x.helper_step
        mo, mh = (x.owner_rank, x.owner_marker), (x.helper_rank, x.helper_marker)
        partner[mo], partner[mh] = mh, mo
        base_o = cost.compute_time(x.owner.kind, x.owner.stage, x.owner.seq_slice)
        base_h = cost.compute_time(x.helper.kind, x.helper.stage, x.helper.seq_slice)
        if not analytic:
            continue
        assert isinstance(cost, AnalyticCost)
        delta, local = moved_attention_time(cost, x)
        layers = cost.workload.layers_per_stage
        req, rep = exchange_bytes(cost, x)
        hw = cost.hw
        per_layer = 2 * hw.p2p_latency_s + (req + rep) / hw.link_bw(cost._span_pp)
        exposed = layers * max(0.0, per_layer - local / layers)
        helper = base_h + delta
        durations[(x.helper_rank, sh)] = helper
        durations[(x.owner_rank, so)] = max(base_o - delta + exposed, helper)
        moved += delta
        traffic += layers * (req + rep)
    return ExchangeTiming(durations=durations, partner=partner, moved_s=moved, bytes_per_step=traffic)


def exchange_summary(schedule: Schedule, cost: CostModel) -> dict[str, object]:
    """Counts, moved attention, traffic and the concurrent attention imbalance (max/min over the ranks of
    each concurrent group, mean over groups; schedule.exchange.balance_stats) with and without exchange."""
    from slimpipe.schedule.exchange import balance_stats

    xs = exchanges(schedule)
    timing = exchange_timing(schedule, cost)
    out: dict[str, object] = {
        "exchanges_f": sum(x.owner.kind is Kind.F for x in xs),
        "exchanges_b": sum(x.owner.kind is Kind.B for x in xs),
        "moved_attention_s": timing.moved_s,
        "exchange_bytes": timing.bytes_per_step,
    }
    for kind in (Kind.F, Kind.B):
        st = balance_stats(schedule, kind)
        out[f"attn_ratio_{kind.value.lower()}"] = [st.mean_ratio_before, st.mean_ratio_after]
    return out
