"""Simulation of a lowered schedule against a cost model: per-rank start/end of every action.

The schedule core's event engine (schedule/engine.py) runs it — the same engine as the dry run, with the
cost model as its Timing: F/B/W take the cost model's duration; SEND_* is a non-blocking isend that takes
no rank time and makes the tensor available to the receiver ``transfer_time`` later; RECV_* blocks until
that tensor is available (its start is when the rank reached it, its end when the tensor arrived). Sends
are matched to receives by the unit they carry, links never contend, and nothing overlaps with compute on
the same rank except the transfers themselves. Attention-exchange markers are rendezvous: the paired F
(or B) units start together, with the moved attention and its transfers in their durations
(sim/exchange.py). Vocabulary collectives (VE/VH/VB) complete when every rank reached them, priced by the
cost model's ``vocab_time``; the ranks that need the result wait for that. If no rank can progress,
DeadlockError carries the stuck actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.schedule.actions import EXCHANGE_KINDS, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.engine import Blocked, run, tables_from_timing
from slimpipe.schedule.errors import DeadlockError, Stuck
from slimpipe.schedule.passes import _gc_paused, lower
from slimpipe.sim.cost import CostModel
from slimpipe.sim.exchange import exchange_timing

__all__ = ["Timeline", "DeadlockError", "simulate", "describe"]

_COMPUTE = (Kind.F, Kind.B, Kind.W)


@dataclass(frozen=True, slots=True)
class Timeline:
    """Simulated execution of one step: ``start[r][i]``/``end[r][i]`` of action ``schedule.ranks[r][i]``."""

    schedule: Schedule
    """The lowered schedule that was simulated."""
    start: tuple[list[float], ...]
    """Per rank, start time of each action (seconds, or units for the uniform cost)."""
    end: tuple[list[float], ...]
    """Per rank, end time of each action; for a RECV the end is when the data arrived."""
    busy: tuple[float, ...]
    """Per rank, total compute (F/B/W) time."""
    makespan: float
    """Time at which the last rank finishes its program."""

    @property
    def bubble_ratio(self) -> float:
        """Idle fraction of total rank-time: 1 − Σ busy / (p · makespan)."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    def compute_events(self, rank: int) -> list[tuple[Action, float, float]]:
        """(action, start, end) of every F/B/W of ``rank`` in program order."""
        prog = self.schedule.ranks[rank]
        return [(a, self.start[rank][i], self.end[rank][i]) for i, a in enumerate(prog) if a.kind in _COMPUTE]


class _CostTiming:
    """A CostModel as the engine's Timing (schedule/engine.py): F/B/W from ``compute_time``, SEND/RECV take
    no rank time, a SEND's tensor is usable ``transfer_time`` later, collectives priced by ``vocab_time``
    (free for cost models without it), exchanged units by sim/exchange.py."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self._vocab = getattr(cost, "vocab_time", None)

    def duration(self, kind: Kind, stage: int, seq_slice: int) -> float:
        return self.cost.compute_time(kind, stage, seq_slice) if kind in _COMPUTE else 0.0

    def latency(self, kind: Kind, stage: int, seq_slice: int) -> float:
        return self.cost.transfer_time(kind, stage, seq_slice)

    def collective(self, kind: Kind, seq_slice: int) -> tuple[float, float]:
        return self._vocab(kind, seq_slice) if self._vocab is not None else (0.0, 0.0)

    def exchanged(self, schedule: Schedule) -> dict[tuple[int, int], float]:
        return exchange_timing(schedule, self.cost).durations


def simulate(schedule: Schedule, cost: CostModel) -> Timeline:
    """Run ``schedule`` (lowered first if compute-only) against ``cost``; raise DeadlockError (the stuck
    actions in ``.stuck``) if no rank can progress."""
    schedule = lower(schedule)  # idempotent
    with _gc_paused():
        try:
            times = run(schedule, tables_from_timing(schedule, _CostTiming(cost)))
        except Blocked as exc:
            stuck = [r for r, prog in enumerate(schedule.ranks) if exc.ptr[r] < len(prog)]
            raise _deadlock(schedule, stuck, exc.ptr) from None
    return Timeline(schedule=schedule, start=times.start, end=times.end, busy=times.busy,
                    makespan=times.makespan)


def _deadlock(schedule: Schedule, stuck_ranks: list[int], ptr: list[int]) -> DeadlockError:
    """The stuck actions as data, and the message they make."""
    stuck = []
    for r in stuck_ranks:
        a = schedule.ranks[r][ptr[r]]
        if a.kind is Kind.RECV_F or a.kind is Kind.RECV_B:
            peer = a.stage - 1 if a.kind is Kind.RECV_F else a.stage + 1
            send = Kind.SEND_F if a.kind is Kind.RECV_F else Kind.SEND_B
            stuck.append(Stuck(r, ptr[r], a, Action(peer, send, a.microbatch, a.seq_slice),
                               schedule.rank_of(peer)))
        elif a.kind in EXCHANGE_KINDS:  # the partner's marker names this rank's unit
            stuck.append(Stuck(r, ptr[r], a, None, a.stage % schedule.num_ranks))
        else:
            stuck.append(Stuck(r, ptr[r], a, None))
    return DeadlockError("simulate", "deadlock: no rank can progress; " + "; ".join(map(describe, stuck)),
                         schedule, stuck)


def describe(s: Stuck) -> str:
    """One stuck rank in words: ``rank 1 at step 0 1RECV_F0.0 waits for 0SEND_F0.0 on rank 0``."""
    a = s.action
    if s.waits_for is not None:
        want = f"{s.waits_for} on rank {s.on_rank}"
    elif a.kind in EXCHANGE_KINDS:
        want = f"its exchange partner's marker on rank {s.on_rank}"
    elif a.kind in VOCAB_KINDS:
        want = "every rank to reach it"
    else:
        want = "?"
    return f"rank {s.rank} at step {s.step} {a} waits for {want}"
