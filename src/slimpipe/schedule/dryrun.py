"""A dependency-driven dry run of lowered programs: the deadlock check and unit-time makespans.

``dry_run`` executes all ranks' lowered programs against each other in O(actions): SEND never blocks, a
RECV waits until its SEND ran (plus an optional latency), a compute action waits for its data (upstream
activation or downstream gradient, the K/V carry of the neighbouring slice, its own forward). Each rank
runs its program strictly in order, so a rank blocked on an action that never becomes ready is a
deadlock, reported with the stuck actions marked. Vocabulary collectives (VE/VH/VB, schedule/vocab.py)
complete when every rank has reached them, so a rank that never gets there is a deadlock too. It is
deliberately low-fidelity: durations per action and one latency for every message, no bandwidth, no
contention (slimpipe.sim models those).

One engine, two paths, one result: the event engine (schedule/engine.py, also behind the placement passes
and ``slimpipe.sim.simulate``) times every program whose order already meets each same-rank dependency
(schedule/engine_check.py); ``_dry_run_generic`` is the reference, keyed by (kind, stage, mb, slice),
which waits for every dependency itself, takes anything the engine cannot index and every deadlock (it
builds the error message). tests/vocab/test_vocab_dry_run.py holds the two equal on every builder grid
and on corrupted programs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slimpipe.schedule.actions import VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.engine import Blocked, OffGrid, run, tables_from_durations
from slimpipe.schedule.engine_check import in_program_order
from slimpipe.schedule.errors import DeadlockError, Stuck
from slimpipe.schedule.passes import _gc_paused, lower, uniform_duration
from slimpipe.schedule.semantics import deps, exchange_waits, has_vocab, vocab_deps, waits_for

__all__ = ["dry_run", "DryRunResult"]

_Key = tuple[Kind, int, int, int]  # (kind, stage, micro-batch, slice): semantics.Key


@dataclass(frozen=True, kw_only=True, slots=True)
class DryRunResult:
    """When every action of a lowered schedule ran, in dependency-driven time."""

    schedule: Schedule
    """The lowered schedule that ran (start/end index its programs)."""
    start: tuple[tuple[float, ...], ...]
    """start[r][i]: time action i of rank r began (with unit durations: the step it ran at)."""
    end: tuple[tuple[float, ...], ...]
    """end[r][i] = start[r][i] + its duration."""
    makespan: float
    """Time the last action of any rank ended."""

    def busy(self) -> tuple[float, ...]:
        """Per rank: total duration of its actions (compute only under uniform_duration)."""
        return tuple(sum(e - s for s, e in zip(st, en)) for st, en in zip(self.start, self.end))

    def bubble_ratio(self) -> float:
        """Idle fraction of p × makespan (0 for an empty schedule)."""
        total = self.makespan * len(self.start)
        return 0.0 if total == 0 else 1.0 - sum(self.busy()) / total


def _deadlock(schedule: Schedule, cursor: list[int], blocked: dict[int, _Key], check: str) -> DeadlockError:
    stuck = []
    for r, i in enumerate(cursor):
        if i < len(schedule.ranks[r]):
            kind, st, mb, j = blocked[r]
            here = schedule.ranks[r][i]
            stuck.append(Stuck(r, i, here, None if here.kind in VOCAB_KINDS else Action(st, kind, mb, j)))
    lines = [f"rank {s.rank} step {s.step}: {s.action} waits for "
             f"{'every rank to reach it' if s.waits_for is None else s.waits_for}" for s in stuck]
    return DeadlockError(
        check,
        "deadlock in the dry run (SEND non-blocking, RECV waits for its SEND, compute waits for its "
        "inputs): " + "; ".join(lines),
        schedule, stuck,
    )


def _dry_run_generic(
    schedule: Schedule, *, duration: Callable[[Action], float] | None, latency: float, check: str
) -> DryRunResult:
    """The reference dry run, keyed by (kind, stage, mb, slice): any program, hand-edited ones included.
    The event engine gives the same times wherever it applies."""
    dur = uniform_duration if duration is None else duration
    p, last, n = schedule.num_ranks, schedule.num_stages - 1, schedule.num_slices
    progs = schedule.ranks
    start: list[list[float]] = [[0.0] * len(prog) for prog in progs]
    end: list[list[float]] = [[0.0] * len(prog) for prog in progs]
    cursor, clock = [0] * p, [0.0] * p
    done: dict[_Key, float] = {}  # action key -> end time
    waiting: dict[_Key, list[int]] = {}  # action key -> ranks blocked on it
    blocked: dict[int, _Key] = {}
    vocab = has_vocab(schedule)
    arrived: dict[_Key, dict[int, float]] = {}  # collective -> {rank: arrival time}
    waits = exchange_waits(schedule)  # (rank, step) of an exchanged F/B -> the partner's marker (rendezvous)
    ready = list(range(p))
    while ready:
        r = ready.pop()
        prog, i, t_rank = progs[r], cursor[r], clock[r]
        while i < len(prog):
            a = prog[i]
            t = t_rank
            hold = None
            for d in deps(a, r, p, last, n) + (vocab_deps(a, last) if vocab else []) + waits.get((r, i), []):
                e = done.get(d)
                if e is None:
                    hold = d
                    break
                if d[0] is Kind.SEND_F or d[0] is Kind.SEND_B:
                    e += latency
                if e > t:
                    t = e
            if hold is None and a.kind in VOCAB_KINDS:  # a collective: done once every rank reached it
                key = (a.kind, a.stage, a.microbatch, a.seq_slice)
                here = arrived.setdefault(key, {})
                here[r] = t
                if key not in done and len(here) == p:
                    done[key] = max(here.values()) + dur(a)
                    ready.extend(waiting.pop(key, ()))
                if not waits_for(a.kind, r, p):  # posts its part and moves on (vocab.waits_for)
                    start[r][i] = end[r][i] = t_rank = t
                    i += 1
                    continue
                if key not in done:
                    hold = key
                else:  # waiting for the others is idle time, not part of the action
                    t_rank = done[key]
                    start[r][i], end[r][i] = t_rank - dur(a), t_rank
                    i += 1
                    continue
            if hold is not None:
                blocked[r] = hold
                waiting.setdefault(hold, []).append(r)
                break
            t_rank = t + dur(a)
            start[r][i], end[r][i] = t, t_rank
            key = (a.kind, a.stage, a.microbatch, a.seq_slice)
            done[key] = t_rank
            ready.extend(waiting.pop(key, ()))
            i += 1
        cursor[r], clock[r] = i, t_rank
    if any(i < len(prog) for i, prog in zip(cursor, progs)):
        raise _deadlock(schedule, cursor, blocked, check)
    return DryRunResult(
        schedule=schedule,
        start=tuple(map(tuple, start)),
        end=tuple(map(tuple, end)),
        makespan=max(clock, default=0.0),
    )



def _dry_run(
    schedule: Schedule, *, duration: Callable[[Action], float] | None, latency: float, check: str,
    table: dict[tuple[Kind, int, int], float] | None = None, trusted: bool = False,
) -> DryRunResult:
    """The dry run of a lowered schedule (dry_run's contract; ``check`` names the caller in errors).

    The event engine (schedule/engine.py) runs it when program order meets every same-rank dependency
    (engine_check.in_program_order; skipped when ``trusted``: a builder's lowered output, as the
    placement passes run it). A deadlock, anything the engine cannot index, or a program the check
    rejects goes to the reference run, which raises the error (stuck actions marked) or times it. ``table``: durations by (kind, stage, slice), for callers whose ``duration`` depends on
    nothing else (it saves asking for every action).
    """
    times = None
    if trusted or in_program_order(schedule):
        try:
            with _gc_paused():
                times = run(schedule, tables_from_durations(schedule, duration, latency, table), arrival=True)
        except (Blocked, OffGrid, IndexError, KeyError, TypeError, ValueError):
            times = None  # TypeError: no duration (a table without it); ValueError: unpaired markers
    if times is None:
        return _dry_run_generic(schedule, duration=duration, latency=latency, check=check)
    return DryRunResult(schedule=schedule, start=tuple(map(tuple, times.start)),
                        end=tuple(map(tuple, times.end)), makespan=times.makespan)


def dry_run(
    schedule: Schedule, *, duration: Callable[[Action], float] | None = None, latency: float = 0.0
) -> DryRunResult:
    """Execute the lowered programs against each other (lowering first if needed); raise ScheduleError
    (check ``dry_run``) with the stuck actions marked on deadlock.

    duration: time of each action (default uniform_duration: F 1, B 2, communication 0). latency: time
    from a SEND's end until its RECV may complete (p2p overlapped with compute: the sender never waits).
    """
    return _dry_run(lower(schedule), duration=duration, latency=latency, check="dry_run")

