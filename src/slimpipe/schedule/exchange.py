"""Attention context exchange as schedule actions: pair concurrent units, mark them, check the markers.

Causal attention makes slice j cost ∝ (j + ½) blocks, so ranks working on different slices at the same
moment straggle (SlimPipe reference §8). Core attention has no weights: the rank whose unit has the longer
K/V prefix (the *owner*) can hand the attention of its earliest prefix slices to the rank running a unit
with a short prefix at the same time (the *helper*), which computes that block without a mask and returns
output and log-sum-exp (forward) or dq, dk, dv (backward).

Pairs come from the schedule, not from a lock-step guess. ``add_exchange`` dry-runs the lowered schedule
with uniform costs (F = 1, B = 2, and one slot of p2p latency under the double warm-up, which is the
latency that warm-up is built to hide), groups the F units (and, separately, the B units) that start at the
same time on different ranks, sorts each group by prefix length (the slice index j: equal slices only) and
pairs the k-th smallest with the k-th largest. Volume = trunc((j_owner − j_helper)/2) slices, clipped to
the threshold; pairs with volume 0 and units without a concurrent partner (warm-up and cool-down edges)
exchange nothing.

Each exchange becomes two markers, one on each rank, right before the rank's own F (or B), naming the
PARTNER's unit: ``3XOWN_F1.4`` before ``0F1.7`` on rank 0 and ``0XHELP_F1.7`` before ``3F1.4`` on rank 3.
The volume follows from the two slice indices and the threshold kept in ``meta.attn_balance``
(:func:`exchange_volume`). ``check_exchange`` (part of ``validate``) checks that markers come in matching
pairs, in the same order on both ranks of a pair; the dry run treats a pair as a rendezvous (each of the
two computes waits until the other rank reached its marker), so an exchange that cannot happen is a
reported deadlock.

Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from slimpipe.config import ConfigError
from slimpipe.schedule.actions import EXCHANGE_KINDS, Action, Kind, Schedule

__all__ = [
    "Exchange", "add_exchange", "strip_exchange", "has_exchange", "exchanges", "exchange_volume",
    "exchange_waits", "check_exchange", "balance_stats", "BalanceStats",
]

_Key = tuple[Kind, int, int, int]  # (kind, stage, micro-batch, slice), as in passes/validate
# marker kind -> (compute kind it precedes, owner?, the partner's marker kind)
_MARKERS = {
    Kind.XOWN_F: (Kind.F, True, Kind.XHELP_F), Kind.XHELP_F: (Kind.F, False, Kind.XOWN_F),
    Kind.XOWN_B: (Kind.B, True, Kind.XHELP_B), Kind.XHELP_B: (Kind.B, False, Kind.XOWN_B),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Exchange:
    """One exchange between two concurrent units of different ranks."""

    owner: Action
    """The owner's F (or B): the longer prefix; it hands the attention of its earliest slices over."""
    helper: Action
    """The helper's concurrent F (or B): it computes the owner's moved block inside its own unit."""
    owner_rank: int
    """Pipeline rank running ``owner``."""
    helper_rank: int
    """Pipeline rank running ``helper``."""
    volume: int
    """Slices of the owner's K/V prefix (its earliest ones) whose attention the helper computes, ≥ 1."""
    owner_step: int
    """Position of ``owner`` in its rank's program."""
    helper_step: int
    """Position of ``helper`` in its rank's program."""
    owner_marker: int
    """Position of the owner's marker (XOWN_F/XOWN_B) in its rank's program."""
    helper_marker: int
    """Position of the helper's marker (XHELP_F/XHELP_B) in its rank's program."""


def exchange_volume(owner_slice: int, helper_slice: int, threshold: int) -> int:
    """trunc((j_owner + j_helper)/2 − j_helper) slices, clipped to ``threshold`` (0: no clip)."""
    vol = (owner_slice - helper_slice) // 2 if owner_slice >= helper_slice else 0
    return min(vol, threshold) if threshold > 0 else vol


def has_exchange(schedule: Schedule) -> bool:
    xo_f, xh_f = Kind.XOWN_F, Kind.XHELP_F  # every exchange has an F or a B marker on some rank
    xo_b, xh_b = Kind.XOWN_B, Kind.XHELP_B
    return any(a.kind is xo_f or a.kind is xh_f or a.kind is xo_b or a.kind is xh_b
               for prog in schedule.ranks for a in prog)


def strip_exchange(schedule: Schedule) -> Schedule:
    """The same schedule without exchange markers (and without the threshold in meta)."""
    if not schedule.meta.attn_balance and not has_exchange(schedule):
        return schedule
    meta = dataclasses.replace(schedule.meta, attn_balance=0)
    ranks = tuple(tuple(a for a in prog if a.kind not in EXCHANGE_KINDS) for prog in schedule.ranks)
    return Schedule(name=schedule.name, num_ranks=schedule.num_ranks, virtual_stages=schedule.virtual_stages,
                    num_microbatches=schedule.num_microbatches, num_slices=schedule.num_slices, ranks=ranks,
                    slice_weights=schedule.slice_weights, meta=meta)


def _check_threshold(threshold: object, schedule: Schedule) -> int:
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
        raise ConfigError(f"--attn-balance={threshold!r} must be a non-negative integer (0 = off): it is the "
                          "most slices of K/V prefix one exchange moves")
    if threshold and schedule.slice_weights is not None:
        raise ConfigError(
            f"--attn-balance={threshold} needs equal slices, but schedule {schedule.name!r} has "
            f"slice_weights={schedule.slice_weights}: use --attn-balance 0 or equal slices (exchange volumes "
            "are whole slices)"
        )
    return threshold


def _concurrent(units: list[tuple[float, int, Action]]) -> list[list[tuple[int, Action]]]:
    """Groups of units with equal start times, from (start, rank, action). Only exact ties: pairs that are
    simultaneous in one feasible timeline cannot deadlock (the rendezvous adds no wait to that timeline,
    so it stays feasible for any durations); pairing units that merely overlap can close a cycle."""
    groups: dict[float, list[tuple[int, Action]]] = defaultdict(list)
    for t, r, a in units:
        groups[t].append((r, a))
    return [groups[t] for t in sorted(groups)]


def _pairs(groups: list[list[tuple[int, Action]]],
           threshold: int) -> list[tuple[tuple[int, Action], tuple[int, Action], int]]:
    """(owner (rank, action), helper (rank, action), volume) per concurrent group, mirror pairing."""
    out = []
    for group in groups:
        units = sorted(group, key=lambda ra: (ra[1].seq_slice, ra[0]))
        for k in range(len(units) // 2):
            helper, owner = units[k], units[-1 - k]
            vol = exchange_volume(owner[1].seq_slice, helper[1].seq_slice, threshold)
            if vol > 0:
                out.append((owner, helper, vol))
    return out


def add_exchange(schedule: Schedule, threshold: int, *, latency: float | None = None, backward: bool = True,
                 duration: Callable[[Action], float] | None = None) -> Schedule:
    """Lower ``schedule`` and add exchange markers for concurrent F pairs (and B pairs if ``backward``).

    threshold: most slices one exchange moves (0 returns the lowered schedule unchanged). The pairing dry
    run uses ``duration`` (default uniform: F = 1, B = 2) and ``latency`` for every message (default with
    uniform durations: 1 under the double warm-up, w = 2, whose lock-step it produces, else 0; with given
    durations: 0). Units are concurrent when they start at the same time. Existing markers are replaced.
    """
    from slimpipe.schedule.dryrun import _dry_run
    from slimpipe.schedule.passes import lower, uniform_duration

    threshold = _check_threshold(threshold, schedule)
    base = lower(strip_exchange(schedule))
    if threshold == 0 or base.num_ranks < 2:
        return base
    if latency is None:
        latency = 1.0 if base.meta.w == 2 and duration is None else 0.0
    dur = duration or uniform_duration
    timeline = _dry_run(base, duration=dur, latency=latency, check="add_exchange")
    units: dict[Kind, list[tuple[float, int, Action]]] = {Kind.F: [], Kind.B: []}
    for r, prog in enumerate(base.ranks):
        for i, a in enumerate(prog):
            if a.kind is Kind.F or (backward and a.kind is Kind.B):
                units[a.kind].append((timeline.start[r][i], r, a))
    before: dict[tuple, Action] = {}  # _key(rank, own compute action) -> marker placed before it
    for kind, (own, helps) in ((Kind.F, (Kind.XOWN_F, Kind.XHELP_F)), (Kind.B, (Kind.XOWN_B, Kind.XHELP_B))):
        for (ro, ao), (rh, ah), _ in _pairs(_concurrent(units[kind]), threshold):
            before[_key(ro, ao)] = Action(ah.stage, own, ah.microbatch, ah.seq_slice)
            before[_key(rh, ah)] = Action(ao.stage, helps, ao.microbatch, ao.seq_slice)
    ranks = []
    for r, prog in enumerate(base.ranks):
        out: list[Action] = []
        for a in prog:
            marker = before.get((r, a.stage, a.kind.value, a.microbatch, a.seq_slice)) if before else None
            if marker is not None:
                out.append(marker)
            out.append(a)
        ranks.append(tuple(out))
    return base.replace_ranks(tuple(ranks), attn_balance=threshold, exchange_latency=latency)


def _own_actions(schedule: Schedule) -> dict[tuple[int, int], tuple[int, Action]]:
    """(rank, marker step) -> (step, action) of the F/B the marker precedes, which must be the very next
    action: a marker stands for "this unit is ready", which the rendezvous relies on (a collective or a
    RECV between the two could stop one partner while the other already waits inside its unit)."""
    own = {}
    xo_f, xh_f, xo_b = Kind.XOWN_F, Kind.XHELP_F, Kind.XOWN_B
    xh_b = Kind.XHELP_B
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            k = a.kind  # identity tests: hashing a str-Enum member calls Python code (hot loop)
            if not (k is xo_f or k is xh_f or k is xo_b or k is xh_b):
                continue
            want = _MARKERS[k][0]
            nxt = prog[i + 1] if i + 1 < len(prog) else None
            if nxt is None or nxt.kind is not want:
                raise _error(f"rank {r} step {i}: {a} must come right before its own {want.value} (next "
                             f"action: {nxt}): re-run add_exchange after any pass that inserts actions",
                             schedule, [(r, i)])
            own[(r, i)] = (i + 1, nxt)
    return own


def _error(message: str, schedule: Schedule, marks=()):
    from slimpipe.schedule.validate import ScheduleError

    return ScheduleError("check_exchange", message, schedule, marks)


def _key(r: int, a: Action) -> tuple[int, int, str, int, int]:
    """Hash key of an action on a rank (the kind's str value: hashing a str-Enum member runs Python code)."""
    return (r, a.stage, a.kind.value, a.microbatch, a.seq_slice)


def exchanges(schedule: Schedule,
              own: dict[tuple[int, int], tuple[int, Action]] | None = None) -> list[Exchange]:
    """Every exchange of a marked schedule (owner-side markers, in rank then program order); checks that
    each marker has its counterpart (check_exchange checks the rest). ``own``: _own_actions, if known."""
    if own is None:
        own = _own_actions(schedule)
    if not own:
        return []
    p, threshold = schedule.num_ranks, schedule.meta.attn_balance
    # (rank, marker) -> (marker step, own step, own action)
    where = {_key(r, schedule.ranks[r][i]): (i, k, a) for (r, i), (k, a) in own.items()}
    out = []
    for (r, i), (k, a) in sorted(own.items()):
        marker = schedule.ranks[r][i]
        _, is_owner, partner_kind = _MARKERS[marker.kind]
        pr = marker.stage % p
        mate = where.get((pr, a.stage, partner_kind.value, a.microbatch, a.seq_slice))
        partner_unit = Action(marker.stage, a.kind, marker.microbatch, marker.seq_slice)
        if pr == r or mate is None or _key(pr, mate[2]) != _key(pr, partner_unit):
            raise _error(f"rank {r} step {i}: {marker} before {a} has no matching "
                         f"{Action(a.stage, partner_kind, a.microbatch, a.seq_slice)} right before "
                         f"{partner_unit} on rank {pr}: markers come in pairs naming each other's unit",
                         schedule, [(r, i)])
        if not is_owner:
            continue
        vol = exchange_volume(a.seq_slice, partner_unit.seq_slice, threshold)
        if vol < 1:
            raise _error(f"rank {r} step {i}: {marker} makes {a} an owner of a volume-{vol} exchange: the "
                         "owner needs a longer prefix than its helper (by ≥ 2 slices)", schedule, [(r, i)])
        out.append(Exchange(owner=a, helper=mate[2], owner_rank=r, helper_rank=pr, volume=vol, owner_step=k,
                            helper_step=mate[1], owner_marker=i, helper_marker=mate[0]))
    return out


def check_exchange(schedule: Schedule) -> None:
    """Markers pair up (each names the other's unit, right before it), volumes are ≥ 1 slice, slices are
    equal, and each pair of ranks lists its exchanges in the same order (one channel, matched by order)."""
    if not has_exchange(schedule):
        return
    if schedule.slice_weights is not None:
        raise _error(f"exchange markers need equal slices (slice_weights={schedule.slice_weights})", schedule)
    per_pair: dict[tuple[int, int], dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    found = exchanges(schedule)
    for n, x in enumerate(found):
        pair = (min(x.owner_rank, x.helper_rank), max(x.owner_rank, x.helper_rank))
        per_pair[pair][x.owner_rank].append((x.owner_step, n))
        per_pair[pair][x.helper_rank].append((x.helper_step, n))
    for (ra, rb), sides in per_pair.items():
        seq_a, seq_b = sorted(sides[ra]), sorted(sides[rb])
        for (ia, na), (ib, nb) in zip(seq_a, seq_b):
            if na != nb:
                xa, xb = found[na], found[nb]
                raise _error(f"ranks {ra} and {rb} order their exchanges differently: rank {ra} step {ia} "
                             f"runs {xa.owner}⇄{xa.helper}, rank {rb} step {ib} runs {xb.owner}⇄{xb.helper}: "
                             "exchange messages match by order on one channel", schedule,
                             [(ra, ia), (rb, ib)])


def exchange_waits(schedule: Schedule) -> dict[tuple[int, int], list[_Key]]:
    """(rank, step of an exchanged F/B) -> the partner's marker it waits for: the dry run's rendezvous.

    The owner's F(U_o) waits until the helper reached ``XHELP_F(U_o)`` and the helper's F(U_h) until the
    owner reached ``XOWN_F(U_h)``; markers themselves take no time and wait for nothing.
    """
    waits: dict[tuple[int, int], list[_Key]] = {}
    if not has_exchange(schedule):
        return waits
    for (r, i), (k, a) in _own_actions(schedule).items():
        partner_kind = _MARKERS[schedule.ranks[r][i].kind][2]
        waits[(r, k)] = [(partner_kind, a.stage, a.microbatch, a.seq_slice)]
    return waits


@dataclass(frozen=True, kw_only=True, slots=True)
class BalanceStats:
    """Attention work of concurrent units (the pairing dry run's groups), in blocks of (s/n)² query-key
    pairs: slice j costs j + ½ (its prefix plus half a diagonal block)."""

    groups: int
    """Concurrent groups (same start time, ≥ 2 ranks) of the chosen kind."""
    mean_ratio_before: float
    """Mean over groups of max/min attention work across the group's ranks, without exchange."""
    mean_ratio_after: float
    """The same with the exchange's volumes moved from owners to helpers."""
    worst_ratio_before: float
    """Largest max/min of any group, without exchange."""
    worst_ratio_after: float
    """Largest max/min of any group, with exchange."""
    moved_blocks: float
    """Blocks moved per step (sum of volumes), over all exchanges of that kind."""


def balance_stats(schedule: Schedule, kind: Kind = Kind.F) -> BalanceStats:
    """Per concurrent group of F (or B) units: attention work max/min over ranks, before and after.

    Groups come from the same dry run add_exchange uses (its latency from meta), so this is the imbalance
    the exchange sees; exchanges of a marked schedule are applied, an unmarked schedule gives after = before.
    """
    from slimpipe.schedule.dryrun import _dry_run

    base = strip_exchange(schedule)
    latency = schedule.meta.exchange_latency
    if latency is None:
        latency = 1.0 if base.meta.w == 2 else 0.0
    timeline = _dry_run(base if base.is_lowered else _lower(base), duration=None, latency=latency,
                        check="balance_stats")
    moved: dict[tuple[int, Action], float] = {}
    total = 0.0
    for x in exchanges(schedule):
        if x.owner.kind is kind:
            moved[(x.owner_rank, x.owner)] = -x.volume
            moved[(x.helper_rank, x.helper)] = x.volume
            total += x.volume
    groups: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for r, prog in enumerate(timeline.schedule.ranks):
        for i, a in enumerate(prog):
            if a.kind is kind:
                work = a.seq_slice + 0.5
                groups[timeline.start[r][i]].append((work, work + moved.get((r, a), 0.0)))
    ratios = [(max(w for w, _ in g) / min(w for w, _ in g), max(w for _, w in g) / min(w for _, w in g))
              for g in groups.values() if len(g) >= 2]
    if not ratios:
        return BalanceStats(groups=0, mean_ratio_before=1.0, mean_ratio_after=1.0, worst_ratio_before=1.0,
                            worst_ratio_after=1.0, moved_blocks=total)
    return BalanceStats(
        groups=len(ratios), mean_ratio_before=sum(b for b, _ in ratios) / len(ratios),
        mean_ratio_after=sum(a for _, a in ratios) / len(ratios),
        worst_ratio_before=max(b for b, _ in ratios), worst_ratio_after=max(a for _, a in ratios),
        moved_blocks=total,
    )


def _lower(schedule: Schedule) -> Schedule:
    from slimpipe.schedule.passes import lower

    return lower(schedule)
