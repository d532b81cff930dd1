"""The event engine: every rank runs its lowered program in order against the others, timed by a cost model.

One engine behind ``dry_run`` (uniform cost), ``validate`` (its pipeline-order check is a dry run), the
placement passes (vocabulary collectives, exchange pairing) and ``slimpipe.sim.simulate`` (a cost model's
durations). The rules are schedule/semantics.py's: F/B/W take their duration on the rank; a SEND never
blocks and makes its tensor usable ``latency`` after it ends; a RECV waits for it; a vocabulary collective
completes once every rank reached it (VE/VB arrive after their local part, VH computes in lock-step between
its collectives) and only the ranks that need its result wait; an exchange marker is a rendezvous, the F/B
after it starts when both partners reached their markers. No bandwidth sharing, no contention.

:class:`Timing` is the cost-model protocol the engine asks, once per (kind, stage, slice): action durations,
message latencies, collective pricing (compute, communication) and the exchanged units' durations.

Cost: each rank runs until it blocks (a RECV whose SEND has not run, a collective it must wait for, a marker
whose partner is not there); whatever unblocks it wakes it, so every action is visited once; actions are
keyed by a flat integer index and tables are flat lists. The loop trusts program order for what a rank
needs from itself (a builder's output, or any valid schedule, meets it); the dry run checks that first
(schedule/engine_check.py) and takes any other program, and every deadlock, to its reference run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from slimpipe.schedule.actions import EXCHANGE_KINDS, NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.engine_loop import Loop, Tables
from slimpipe.schedule.passes import _UNIFORM, uniform_duration
from slimpipe.schedule.semantics import exchanges, kinds

__all__ = ["Timing", "Tables", "Times", "Blocked", "OffGrid", "run", "tables_from_timing",
           "tables_from_durations", "layout", "flat_key"]

# Flat index ("key") of an action: slot·U + unit (U = stages·m·n, unit = (stage·m + mb)·n + slice);
# collectives after them at len(SLOTS)·U + kind·m·n + mb·n + slice.
SLOTS = (Kind.F, Kind.B, Kind.W, Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B,
         Kind.XOWN_F, Kind.XHELP_F, Kind.XOWN_B, Kind.XHELP_B)
VOCAB_SLOTS = (Kind.VE, Kind.VH, Kind.VB)
_TIMED_COMM = frozenset(SLOTS[3:])  # kinds that take rank time only if a dry run's duration says so


class Timing(Protocol):
    """What the engine asks a cost model (seconds, or units of one forward for the uniform cost)."""

    def duration(self, kind: Kind, stage: int, seq_slice: int) -> float:
        """Rank time of an F/B/W of any micro-batch of ``stage`` on slice ``seq_slice``."""
        ...

    def latency(self, kind: Kind, stage: int, seq_slice: int) -> float:
        """Time from the end of a SEND_F/SEND_B of (stage, slice) until its receiver may use the tensor."""
        ...

    def collective(self, kind: Kind, seq_slice: int) -> tuple[float, float]:
        """(per-rank compute, communication) of vocabulary collective ``kind`` on slice ``seq_slice``."""
        ...

    def exchanged(self, schedule: Schedule) -> dict[tuple[int, int], float]:
        """(rank, step) of an exchanged F/B -> its duration (the moved attention and its transfers)."""
        ...


class OffGrid(Exception):
    """An action the flat index cannot hold (off the unit grid, a collective with a stage, a marker
    without its partner, no duration for it): the caller's reference path decides."""


class Blocked(Exception):
    """No rank can progress; ``ptr[r]``: the step rank r is stuck at (its program length if done)."""

    def __init__(self, ptr: list[int]) -> None:
        super().__init__("deadlock")
        self.ptr = ptr


def layout(schedule: Schedule) -> tuple[dict[Kind, int], int]:
    """(offset of each kind's keys, number of keys)."""
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    size = num * m * n
    offset = {k: i * size for i, k in enumerate(SLOTS)}
    offset.update({k: len(SLOTS) * size + i * m * n for i, k in enumerate(VOCAB_SLOTS)})
    return offset, len(SLOTS) * size + len(VOCAB_SLOTS) * m * n


def flat_key(a: Action, schedule: Schedule, offset: dict[Kind, int]) -> int:
    """The flat index of ``a`` (raises OffGrid off the grid)."""
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    vocab = a.kind in VOCAB_KINDS
    if not (0 <= a.microbatch < m and 0 <= a.seq_slice < n) or (
            a.stage != NO_STAGE if vocab else not 0 <= a.stage < num):
        raise OffGrid
    return offset[a.kind] + ((0 if vocab else a.stage * m) + a.microbatch) * n + a.seq_slice


def tables_from_timing(schedule: Schedule, timing: Timing) -> Tables:
    """Ask ``timing`` once per (kind, stage, slice) of the kinds the schedule uses. SEND/RECV and markers
    take no rank time here (the simulator's convention); the transfer is the SEND's latency."""
    offset, size = layout(schedule)
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    used = kinds(schedule)
    dur: list[float | None] = [0.0] * size
    lat, comp, comm = [0.0] * size, [0.0] * size, [0.0] * size
    mn = m * n
    for k in used:
        if k in VOCAB_KINDS:  # one row of n values, repeated for every micro-batch
            priced = [timing.collective(k, j) for j in range(n)]
            comp[offset[k]: offset[k] + mn] = [c for c, _ in priced] * m
            comm[offset[k]: offset[k] + mn] = [x for _, x in priced] * m
        elif k is Kind.F or k is Kind.B or k is Kind.W:
            for s in range(num):
                base = offset[k] + s * mn
                dur[base: base + mn] = [timing.duration(k, s, j) for j in range(n)] * m
        elif k is Kind.SEND_F or k is Kind.SEND_B:
            for s in range(num):
                base = offset[k] + s * mn
                lat[base: base + mn] = [timing.latency(k, s, j) for j in range(n)] * m
    xd = timing.exchanged(schedule) if not used.isdisjoint(EXCHANGE_KINDS) else {}
    return Tables(dur=dur, lat=lat, comp=comp, comm=comm, exchanged=xd)


def tables_from_durations(schedule: Schedule, duration: Callable[[Action], float] | None, latency: float,
                          table: dict[tuple[Kind, int, int], float] | None = None) -> Tables:
    """The dry run's timing: ``duration`` per action (a collective's is its communication), one latency
    for every message. ``table``: durations by (kind, stage, slice) for a ``duration`` that depends on
    nothing else (None where it has none: OffGrid when such an action runs)."""
    offset, size = layout(schedule)
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    dur: list[float | None]
    comm_time = False  # uniform: communication and markers are free
    if table is not None:
        comm_time = any(d for (k, _, _), d in table.items() if k in _TIMED_COMM)
        dur = [None] * size
        for (kind, st, j), d in table.items():
            if kind in VOCAB_KINDS and st == NO_STAGE and 0 <= j < n:
                dur[offset[kind] + j: offset[kind] + m * n: n] = [d] * m  # every micro-batch
            elif kind not in VOCAB_KINDS and 0 <= st < num and 0 <= j < n:
                base = offset[kind] + st * m * n + j
                dur[base: base + m * n: n] = [d] * m
    elif duration is None or duration is uniform_duration:
        per_slot = num * m * n
        dur = []
        for k in SLOTS:
            dur += [_UNIFORM.get(k, 0.0)] * per_slot
        dur += [0.0] * (size - len(dur))
    else:
        dur = [None] * size
        for prog in schedule.ranks:
            for a in prog:
                dur[flat_key(a, schedule, offset)] = d = duration(a)
                comm_time = comm_time or (d != 0 and a.kind in _TIMED_COMM)
    lo = len(SLOTS) * num * m * n
    comm = [0.0] * lo + [d if d is not None else 0.0 for d in dur[lo:]]
    return Tables(dur=dur, lat=[latency] * size, comp=[0.0] * size, comm=comm, comm_time=comm_time)


@dataclass(frozen=True, slots=True)
class Times:
    """One run: per rank, start and end of every action, busy time (F/B/W and collective compute)."""

    start: tuple[list[float], ...]
    end: tuple[list[float], ...]
    busy: tuple[float, ...]
    makespan: float


def run(schedule: Schedule, tables: Tables, *, arrival: bool = False) -> Times:
    """Run a lowered schedule. ``arrival``: a RECV starts when its tensor is there (and a marker when its
    rank reached it), as the dry run reports them; else when the rank reached it (a RECV's wait is part of
    it) and a marker at the rendezvous, as the simulator reports them. Raises Blocked on deadlock, OffGrid
    for what the flat index cannot hold."""
    loop = Loop(schedule, tables, arrival, _partners(schedule))
    work = list(range(schedule.num_ranks - 1, -1, -1))
    while work:
        work.extend(loop.advance(work.pop()))
    if any(i < len(prog) for i, prog in zip(loop.ptr, schedule.ranks)):
        raise Blocked(loop.ptr)
    return Times(start=loop.starts, end=loop.ends, busy=tuple(loop.busy), makespan=max(loop.clock, default=0.0))


def _partners(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """(rank, step) of each exchange marker -> its partner's (the rendezvous)."""
    if kinds(schedule).isdisjoint(EXCHANGE_KINDS):
        return {}
    pairs = exchanges(schedule)  # ScheduleError for unpaired markers (the dry run's reference reports them)
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for x in pairs:
        mo, mh = (x.owner_rank, x.owner_marker), (x.helper_rank, x.helper_marker)
        out[mo], out[mh] = mh, mo
    return out
