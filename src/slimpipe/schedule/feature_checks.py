"""The checks of the feature actions: vocabulary collectives and attention-exchange markers.

Part of ``validate`` (schedule/validate.py runs them with the other invariants); each is a no-op for a
schedule without those actions, and each raises ScheduleError naming its check with the cells marked.
"""

from __future__ import annotations

from collections import defaultdict

from slimpipe.schedule.actions import NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.errors import ScheduleError
from slimpipe.schedule.semantics import COLLECTIVE_ORDER, exchanges, has_exchange, has_vocab

__all__ = ["check_vocab_collectives", "check_exchange", "vocab_order"]


def _vocab_error(message: str, schedule: Schedule, marks=()) -> ScheduleError:
    return ScheduleError("check_vocab_collectives", message, schedule, marks)


def _exchange_error(message: str, schedule: Schedule, marks=()) -> ScheduleError:
    return ScheduleError("check_exchange", message, schedule, marks)


def vocab_order(schedule: Schedule, rank: int) -> list[tuple[int, Action]]:
    """(step, action) of the vocabulary collectives of ``rank``, in program order."""
    return [(i, a) for i, a in enumerate(schedule.ranks[rank]) if a.kind in VOCAB_KINDS]


def check_vocab_collectives(schedule: Schedule) -> None:
    """Schedules with vocabulary collectives: each VE/VH/VB of every (mb, slice) exactly once on every rank,
    in the same order everywhere (collectives match by call order), and on the owner ranks on the right
    side of the compute they feed or consume. No-op for schedules without them."""
    if not has_vocab(schedule):
        return
    s, p = schedule, schedule.num_ranks
    want = {(k, mb, j) for k in VOCAB_KINDS for mb in range(s.num_microbatches) for j in range(s.num_slices)}
    orders = [vocab_order(s, r) for r in range(p)]
    for r, order in enumerate(orders):
        seen: dict[tuple[Kind, int, int], int] = {}
        for i, a in order:
            key = (a.kind, a.microbatch, a.seq_slice)
            if a.stage != NO_STAGE or key not in want:
                raise _vocab_error(f"rank {r} step {i}: {a!r} is not a collective of the schedule (stage must be "
                             f"{NO_STAGE}, micro-batch < m, slice < n)", s, [(r, i)])
            if key in seen:
                raise _vocab_error(f"rank {r}: {a} appears twice (steps {seen[key]} and {i})", s,
                             [(r, seen[key]), (r, i)])
            seen[key] = i
        missing = sorted(want - set(seen), key=lambda k: (k[1], k[2], COLLECTIVE_ORDER[k[0]]))
        if missing:
            k, mb, j = missing[0]
            raise _vocab_error(f"rank {r} lacks {Action(NO_STAGE, k, mb, j)} ({len(missing)} missing): every rank "
                         "runs every vocabulary collective; re-run add_vocab_parallel", s)
    for r in range(1, p):
        for (i0, a0), (i, a) in zip(orders[0], orders[r]):
            if a0 != a:
                raise _vocab_error(f"collective order differs: rank 0 step {i0} runs {a0}, rank {r} step {i} runs "
                             f"{a}: collectives match by call order, so every rank must list them alike",
                             s, [(0, i0), (r, i)])
    _check_owner_sides(s)


def _check_owner_sides(s: Schedule) -> None:
    """Rank 0: VE before F(0), VB after B(0); last rank: F(last) < VH < B(last) (same mb, slice)."""
    last, p = s.num_stages - 1, s.num_ranks
    rules = (  # (rank, collective, compute kind, stage, collective must come before it?)
        (0, Kind.VE, Kind.F, 0, True), (0, Kind.VB, Kind.B, 0, False),
        (p - 1, Kind.VH, Kind.F, last, False), (p - 1, Kind.VH, Kind.B, last, True),
    )
    for r, coll, comp, stage, before in rules:
        pos = {(a.kind, a.stage, a.microbatch, a.seq_slice): i for i, a in enumerate(s.ranks[r])}
        for (kind, st, mb, j), i in pos.items():
            if kind is not coll:
                continue
            ci = pos.get((comp, stage, mb, j))
            if ci is not None and (i < ci) != before:
                side = "before" if before else "after"
                raise _vocab_error(f"rank {r} step {i}: {s.ranks[r][i]} must run {side} {s.ranks[r][ci]} "
                             f"(step {ci}): it produces or consumes that unit's tensor", s, [(r, i), (r, ci)])


def check_exchange(schedule: Schedule) -> None:
    """Markers pair up (each names the other's unit, right before it), volumes are ≥ 1 slice, slices are
    equal, and each pair of ranks lists its exchanges in the same order (one channel, matched by order)."""
    if not has_exchange(schedule):
        return
    if schedule.slice_weights is not None:
        raise _exchange_error(f"exchange markers need equal slices (slice_weights={schedule.slice_weights})", schedule)
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
                raise _exchange_error(f"ranks {ra} and {rb} order their exchanges differently: rank {ra} step {ia} "
                             f"runs {xa.owner}⇄{xa.helper}, rank {rb} step {ib} runs {xb.owner}⇄{xb.helper}: "
                             "exchange messages match by order on one channel", schedule,
                             [(ra, ia), (rb, ib)])
