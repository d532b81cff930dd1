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

The dependency rules of the collectives (``waits_for``, ``vocab_deps``) live in schedule/semantics.py,
their check in schedule/feature_checks.py; both are re-exported here. Imports no torch.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from itertools import compress, islice
from operator import attrgetter, le, not_

from slimpipe.schedule.actions import EXCHANGE_KINDS, NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.dryrun import _dry_run
from slimpipe.schedule.exchange import add_exchange, strip_exchange
from slimpipe.schedule.feature_checks import check_vocab_collectives, vocab_order
from slimpipe.schedule.passes import _gc_paused, lower, uniform_duration
from slimpipe.schedule.semantics import COLLECTIVE_ORDER, has_vocab, kinds, vocab_deps, waits_for

__all__ = [
    "add_vocab_parallel", "has_vocab", "vocab_deps", "waits_for", "check_vocab_collectives", "vocab_order",
]

_KIND = attrgetter("kind")
_KIND_STAGE_SLICE = attrgetter("kind", "stage", "seq_slice")
_MICROBATCH = attrgetter("microbatch")


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
    return sorted((t, COLLECTIVE_ORDER[k], mb, j, k) for (k, mb, j), t in times.items())


def add_vocab_parallel(schedule: Schedule, *, duration: Callable[[Action], float] | None = None,
                       batch: bool = True) -> Schedule:
    """Lower the schedule (if needed) and insert VE/VH/VB for every (micro-batch, slice) into every rank.

    ``duration``: action durations of the placement timeline (default: passes.uniform_duration, F = 1,
    B = 2); a cost model's durations align the collectives with where ranks really are. It is asked once
    per (kind, stage, slice), with one action of each: durations may not depend on the micro-batch.
    ``batch``: VE and VH once per micro-batch (_due_times), else per slice. A schedule that already has
    vocabulary collectives is returned unchanged (idempotent); attention-exchange markers are derived
    again after the collectives are placed (add_exchange pairs units that start together, which lock-step
    preserves). The placement run trusts the program order of its input (a builder's is right; validate a
    hand-made one first).
    """
    used = kinds(schedule)
    if not used.isdisjoint(VOCAB_KINDS):
        return schedule
    if not used.isdisjoint(EXCHANGE_KINDS):  # a marker must stay right before its compute: place, pair
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
                            table=table, trusted=True)
        due = _due_times(lowered, timeline.start, timeline.end, batch)
        colls = [(t, Action(NO_STAGE, kind, mb, j)) for t, _, mb, j, kind in due]
        ranks = tuple(_place(prog, ends, colls) for prog, ends in zip(lowered.ranks, timeline.end))
    return lowered.replace_ranks(ranks, vocab_parallel=True)


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
