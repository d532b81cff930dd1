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

The pairs' semantics (``exchanges``, ``exchange_waits``, ``Exchange``) live in schedule/semantics.py and
``check_exchange`` in schedule/feature_checks.py; both are re-exported here. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from slimpipe.config import ConfigError
from slimpipe.schedule.actions import EXCHANGE_KINDS, Action, Kind, Schedule
from slimpipe.schedule.dryrun import _dry_run
from slimpipe.schedule.feature_checks import check_exchange
from slimpipe.schedule.passes import lower, uniform_duration
from slimpipe.schedule.semantics import (
    Exchange, action_key, exchange_volume, exchange_waits, exchanges, has_exchange,
)

__all__ = [
    "Exchange", "add_exchange", "strip_exchange", "has_exchange", "exchanges", "exchange_volume",
    "exchange_waits", "check_exchange", "balance_stats", "BalanceStats",
]


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
    The pairing run trusts the program order of its input (a builder's is right; validate a hand-made one).
    """
    threshold = _check_threshold(threshold, schedule)
    base = lower(strip_exchange(schedule))
    if threshold == 0 or base.num_ranks < 2:
        return base
    if latency is None:
        latency = 1.0 if base.meta.w == 2 and duration is None else 0.0
    dur = duration or uniform_duration
    timeline = _dry_run(base, duration=dur, latency=latency, check="add_exchange", trusted=True)
    units: dict[Kind, list[tuple[float, int, Action]]] = {Kind.F: [], Kind.B: []}
    for r, prog in enumerate(base.ranks):
        for i, a in enumerate(prog):
            if a.kind is Kind.F or (backward and a.kind is Kind.B):
                units[a.kind].append((timeline.start[r][i], r, a))
    before: dict[tuple, Action] = {}  # action_key(rank, own compute action) -> marker placed before it
    for kind, (own, helps) in ((Kind.F, (Kind.XOWN_F, Kind.XHELP_F)), (Kind.B, (Kind.XOWN_B, Kind.XHELP_B))):
        for (ro, ao), (rh, ah), _ in _pairs(_concurrent(units[kind]), threshold):
            before[action_key(ro, ao)] = Action(ah.stage, own, ah.microbatch, ah.seq_slice)
            before[action_key(rh, ah)] = Action(ao.stage, helps, ao.microbatch, ao.seq_slice)
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
    base = strip_exchange(schedule)
    latency = schedule.meta.exchange_latency
    if latency is None:
        latency = 1.0 if base.meta.w == 2 else 0.0
    timeline = _dry_run(base if base.is_lowered else lower(base), duration=None, latency=latency,
                        check="balance_stats", trusted=True)
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
