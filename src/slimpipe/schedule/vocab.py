"""Vocabulary parallelism as schedule actions: place the lock-step VE/VH/VB collectives into every rank.

With ``--vocab-parallel`` the embedding and the output layer are sharded along the vocabulary over all p
ranks (SlimPipe reference §9, docs/vocab_parallel.md). Three collectives per (micro-batch, slice) replace
the vocabulary work of the end stages, and every rank runs each of them:

* ``VE mb.j`` (embedding forward): every rank looks up its shard, the sum is reduced to rank 0, which uses
  it as the input of ``F(0, mb, j)``;
* ``VH mb.j`` (head forward + backward): the last stage's normalised output is broadcast, every rank
  computes its vocabulary shard of the logits and of the cross-entropy (global max and sum-exp by
  all-reduce) and at once its gradients; the hidden-state gradients are reduced to the last rank, where they
  are the output gradient of ``B(last, mb, j)``;
* ``VB mb.j`` (embedding backward): rank 0's input gradient of ``B(0, mb, j)`` is broadcast and every rank
  accumulates its shard's rows.

Collectives must be called in the same order on every rank. ``add_vocab_parallel`` picks that order from a
dry-run timeline of the lowered schedule (uniform costs unless ``duration`` is given; a message is usable
one forward after its send, the lock-step premise of the double warm-up): each collective gets the time its
owner needs it (VE: start of rank 0's ``F(0, mb, j)``; VH: end of the last rank's ``F(last, mb, j)``; VB:
end of rank 0's ``B(0, mb, j)``), and every rank runs it after its last action that ends by that time.
Placing by one timeline keeps the order consistent and deadlock-free: an action placed before a collective
ends by its time, one placed after ends later, and dependencies only point from earlier-ending to
later-starting actions, so no rank waits at a collective for work behind another rank's copy of it.
``waits_for`` says which ranks block at each collective (VH: all; VE: rank 0; VB: none).
``check_vocab_collectives`` (part of ``validate``) and the dry run (a collective completes when every rank
reached it) check any schedule carrying them, hand-edited ones included.

Imports no torch; validate/passes are imported lazily (they import this module).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from itertools import compress, islice
from operator import attrgetter, le, not_

from slimpipe.schedule.actions import EXCHANGE_KINDS, NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule

__all__ = [
    "add_vocab_parallel", "has_vocab", "vocab_deps", "waits_for", "check_vocab_collectives", "vocab_order",
]

_Key = tuple[Kind, int, int, int]  # (kind, stage, micro-batch, slice), as in passes/validate
_KIND_ORDER = {Kind.VE: 0, Kind.VH: 1, Kind.VB: 2}  # tie-break between collectives due at the same time
_KIND = attrgetter("kind")
_KIND_STAGE_SLICE = attrgetter("kind", "stage", "seq_slice")
_MICROBATCH = attrgetter("microbatch")


def has_vocab(schedule: Schedule) -> bool:
    """Whether the schedule carries vocabulary collectives."""
    return not _kinds(schedule).isdisjoint(VOCAB_KINDS)


def vocab_deps(a: Action, last: int) -> list[_Key]:
    """Extra data dependencies in a vocabulary-parallel schedule (the dry run adds them): F of stage 0
    needs its VE (the embedding sum), B of the last stage its VH (the output gradient).

    A collective itself completes once every rank reached it; the owner reaches it only after the compute
    it consumes (VH after F(last), VB after B(0): check_vocab_collectives), so that needs no entry here.
    """
    if a.kind is Kind.F and a.stage == 0:
        return [(Kind.VE, NO_STAGE, a.microbatch, a.seq_slice)]
    if a.kind is Kind.B and a.stage == last:
        return [(Kind.VH, NO_STAGE, a.microbatch, a.seq_slice)]
    return []


def waits_for(kind: Kind, rank: int, p: int) -> bool:
    """Whether ``rank`` blocks until collective ``kind`` completes, or posts its part and moves on.

    VE: only rank 0 needs the sum; the others post an asynchronous reduce. VH: every rank computes its
    logits between the broadcast and the reductions, so all wait. VB: rank 0 is the broadcast root and the
    others apply their rows when it has arrived (by their next VH or at the end of the step), so nobody
    waits at the action. Every rank still posts every collective, in one order.
    """
    if kind is Kind.VE:
        return rank == 0
    return kind is Kind.VH


def _due_times(lowered: Schedule, start, end, batch: bool) -> list[tuple[float, int, int, int, Kind]]:
    """(time, kind order, mb, slice, kind) of every collective: when its owner needs it.

    ``batch``: one time per micro-batch for VE (the start of F(0, mb, 0): every slice's embedding is ready
    before the first is used) and VH (the end of the micro-batch's last F(last): every backward of the
    last stage comes after it), so all ranks meet once per micro-batch instead of once per slice; VB stays
    per slice (nobody waits for it).
    """
    last, p = lowered.num_stages - 1, lowered.num_ranks
    F, B, VE, VB, VH = Kind.F, Kind.B, Kind.VE, Kind.VB, Kind.VH  # locals: Enum lookups are slow
    times: dict[tuple[Kind, int, int], float] = {}
    for i, a in enumerate(lowered.ranks[0]):  # stage 0 lives on rank 0
        if a.stage == 0 and (a.kind is F or a.kind is B):
            if a.kind is F:
                times[(VE, a.microbatch, a.seq_slice)] = start[0][i]
            else:
                times[(VB, a.microbatch, a.seq_slice)] = end[0][i]
    for i, a in enumerate(lowered.ranks[p - 1]):  # the last stage on the last rank
        if a.stage == last and a.kind is F:
            times[(VH, a.microbatch, a.seq_slice)] = end[p - 1][i]
    if batch:
        first_ve: dict[int, float] = {}
        last_vh: dict[int, float] = {}
        for (k, mb, _), t in times.items():
            if k is Kind.VE:
                first_ve[mb] = min(t, first_ve.get(mb, t))
            elif k is Kind.VH:
                last_vh[mb] = max(t, last_vh.get(mb, t))
        for k, mb, j in times:
            if k is not Kind.VB:
                times[(k, mb, j)] = (first_ve if k is Kind.VE else last_vh)[mb]
    return sorted((t, _KIND_ORDER[k], mb, j, k) for (k, mb, j), t in times.items())


def add_vocab_parallel(schedule: Schedule, *, duration: Callable[[Action], float] | None = None,
                       batch: bool = True) -> Schedule:
    """Lower the schedule (if needed) and insert VE/VH/VB for every (micro-batch, slice) into every rank.

    ``duration``: action durations of the placement timeline (default: passes.uniform_duration, F = 1,
    B = 2); a cost model's durations align the collectives with where ranks really are. It is asked once
    per (kind, stage, slice), with one action of each: durations may not depend on the micro-batch.
    ``batch``: VE and VH once per micro-batch (_due_times), else per slice. A schedule that already has
    vocabulary collectives is returned unchanged (idempotent); attention-exchange markers are derived
    again after the collectives are placed (add_exchange pairs units that start together, which lock-step
    preserves).
    """
    from slimpipe.schedule.exchange import add_exchange, strip_exchange
    from slimpipe.schedule.dryrun import _dry_run
    from slimpipe.schedule.passes import _gc_paused, lower

    kinds = _kinds(schedule)
    if not kinds.isdisjoint(VOCAB_KINDS):
        return schedule
    if not kinds.isdisjoint(EXCHANGE_KINDS):  # a marker must stay right before its compute: place, pair
        plain = add_vocab_parallel(strip_exchange(schedule), duration=duration, batch=batch)
        return add_exchange(plain, schedule.meta.attn_balance)
    with _gc_paused():
        lowered = lower(schedule)
        table = None if duration is None else _table(lowered, duration)
        # Lock-step timeline: a tensor sent by one rank's F is used one forward later (the double
        # warm-up's premise). With latency 0 the ranks drift apart and every collective would stall
        # someone (p4 n8 m4: +45 % makespan against +3 % this way, docs/vocab_parallel.md).
        latency = _mean_forward(lowered, duration, table)
        timeline = _dry_run(lowered, duration=duration, latency=latency, check="add_vocab_parallel",
                            table=table)
        due = _due_times(lowered, timeline.start, timeline.end, batch)
        colls = [(t, Action(NO_STAGE, kind, mb, j)) for t, _, mb, j, kind in due]
        ranks = tuple(_place(prog, ends, colls) for prog, ends in zip(lowered.ranks, timeline.end))
    return lowered.replace_ranks(ranks, vocab_parallel=True)


def _kinds(schedule: Schedule) -> set[Kind]:
    """Every action kind the schedule uses (one C-level pass: Kind hashes as its str)."""
    kinds: set[Kind] = set()
    for prog in schedule.ranks:
        kinds.update(map(_KIND, prog))
    return kinds


def _table(lowered: Schedule, duration: Callable[[Action], float]) -> dict[tuple[Kind, int, int], float]:
    """``duration`` by (kind, stage, slice), asked once each, of micro-batch 0's actions (every unit has
    one; a (kind, stage, slice) with none there sends the dry run to its reference path)."""
    first: dict[tuple[Kind, int, int], Action] = {}
    for prog in lowered.ranks:
        mb0 = list(compress(prog, map(not_, map(_MICROBATCH, prog))))
        first.update(zip(map(_KIND_STAGE_SLICE, mb0), mb0))
    return {key: duration(a) for key, a in first.items()}


def _mean_forward(lowered: Schedule, duration: Callable[[Action], float] | None,
                  table: dict[tuple[Kind, int, int], float] | None) -> float:
    """Mean duration of the F actions (summed in rank, then program order, as a plain loop would)."""
    from slimpipe.schedule.passes import uniform_duration

    fwd: list[float | None] = []
    for prog in lowered.ranks:
        fs = list(compress(prog, map(Kind.F.__eq__, map(_KIND, prog))))
        if table is None:
            fwd += [uniform_duration(fs[0])] * len(fs) if fs else []
        else:
            fwd += map(table.get, map(_KIND_STAGE_SLICE, fs))
    if None in fwd:  # an F whose (kind, stage, slice) micro-batch 0 lacks: ask for each
        fwd = [duration(a) for prog in lowered.ranks for a in prog if a.kind is Kind.F]  # type: ignore[misc]
    return sum(fwd) / max(1, len(fwd))  # type: ignore[arg-type]


def _place(prog: tuple[Action, ...], ends: tuple[float, ...],
           colls: list[tuple[float, Action]]) -> tuple[Action, ...]:
    """``prog`` with each collective (due time, action; sorted by time) after the last action that ended
    by its time. Ends of a dry run never decrease along a program, so a bisection finds the spot."""
    out: list[Action] = []
    i, size = 0, len(prog)
    monotone = all(map(le, ends, islice(ends, 1, None)))
    for t, coll in colls:
        if monotone:
            k = bisect_right(ends, t, i)
        else:  # durations < 0 (hand-made): walk as long as actions end by t
            k = i
            while k < size and ends[k] <= t:
                k += 1
        out.extend(prog[i:k])
        out.append(coll)
        i = k
    out.extend(prog[i:])
    return tuple(out)


def vocab_order(schedule: Schedule, rank: int) -> list[tuple[int, Action]]:
    """(step, action) of the vocabulary collectives of ``rank``, in program order."""
    return [(i, a) for i, a in enumerate(schedule.ranks[rank]) if a.kind in VOCAB_KINDS]


def _error(message: str, schedule: Schedule, marks=()):
    from slimpipe.schedule.validate import ScheduleError

    return ScheduleError("check_vocab_collectives", message, schedule, marks)


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
                raise _error(f"rank {r} step {i}: {a!r} is not a collective of the schedule (stage must be "
                             f"{NO_STAGE}, micro-batch < m, slice < n)", s, [(r, i)])
            if key in seen:
                raise _error(f"rank {r}: {a} appears twice (steps {seen[key]} and {i})", s,
                             [(r, seen[key]), (r, i)])
            seen[key] = i
        missing = sorted(want - set(seen), key=lambda k: (k[1], k[2], _KIND_ORDER[k[0]]))
        if missing:
            k, mb, j = missing[0]
            raise _error(f"rank {r} lacks {Action(NO_STAGE, k, mb, j)} ({len(missing)} missing): every rank "
                         "runs every vocabulary collective; re-run add_vocab_parallel", s)
    for r in range(1, p):
        for (i0, a0), (i, a) in zip(orders[0], orders[r]):
            if a0 != a:
                raise _error(f"collective order differs: rank 0 step {i0} runs {a0}, rank {r} step {i} runs "
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
                raise _error(f"rank {r} step {i}: {s.ranks[r][i]} must run {side} {s.ranks[r][ci]} "
                             f"(step {ci}): it produces or consumes that unit's tensor", s, [(r, i), (r, ci)])
