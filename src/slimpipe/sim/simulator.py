"""Discrete-event simulation of a lowered schedule: per-rank start/end of every action; deadlock detection.

The model, deliberately simple: each rank runs its program in order on one compute stream. F/B/W take the
cost model's duration; SEND_* is a non-blocking isend that takes no rank time and makes the tensor
available to the receiver ``transfer_time`` later; RECV_* blocks until that tensor is available. Sends are
matched to receives by the unit they carry (not by arrival order), links never contend, and nothing
overlaps with compute on the same rank except the transfers themselves. If at some point no rank can
progress, the stuck RECVs are reported as a deadlock. Attention-exchange markers are rendezvous: the
paired F (or B) units start together, with the moved attention and its transfers in their durations
(sim/exchange.py). Vocabulary collectives (VE/VH/VB) complete when every rank reached them; the ranks that
need the result wait for that (sim/vocab.py).

Cost: one pass over the actions (a rank runs until it blocks; a send wakes the rank blocked on it), with
durations tabulated once per (kind, stage, slice).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.schedule.actions import EXCHANGE_KINDS, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.errors import DeadlockError, Stuck
from slimpipe.schedule.passes import _gc_paused, lower
from slimpipe.schedule.semantics import kinds as _kinds
from slimpipe.sim.cost import CostModel
from slimpipe.sim.exchange import exchange_timing
from slimpipe.sim.vocab import VocabClock

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


def _tables(schedule: Schedule, cost: CostModel, kinds: set[Kind]) -> tuple[dict, dict]:
    """Duration of every (kind, stage, slice) compute and transfer of the ``kinds`` the schedule uses,
    asked once each."""
    stages, n = range(schedule.num_stages), range(schedule.num_slices)
    dur = {(k, s, j): cost.compute_time(k, s, j) for k in _COMPUTE if k in kinds for s in stages for j in n}
    sends = (Kind.SEND_F, Kind.SEND_B)
    xfer = {(k, s, j): cost.transfer_time(k, s, j) for k in sends if k in kinds for s in stages for j in n}
    return dur, xfer


class _Run:
    """Mutable state of one simulation: per-rank cursors and clocks, arrival times of sent tensors."""

    def __init__(self, schedule: Schedule, cost: CostModel) -> None:
        kinds = _kinds(schedule)  # one C-level scan instead of has_exchange's and has_vocab's
        self.dur, self.xfer = _tables(schedule, cost, kinds)
        self.m, self.n = schedule.num_microbatches, schedule.num_slices
        self.progs = schedule.ranks
        p = len(self.progs)
        # ready_f[u]: when the input of F(u) arrives at its rank; u = (stage·m + mb)·n + slice; -1 = not sent.
        size = schedule.num_stages * self.m * self.n
        self.ready_f, self.ready_b = [-1.0] * size, [-1.0] * size
        self.wait_f: dict[int, int] = {}
        self.wait_b: dict[int, int] = {}
        self.starts = tuple([0.0] * len(prog) for prog in self.progs)
        self.ends = tuple([0.0] * len(prog) for prog in self.progs)
        self.ptr, self.clock, self.busy = [0] * p, [0.0] * p, [0.0] * p
        # Attention context exchange (sim/exchange.py): exchanged units' durations, marker rendezvous.
        xt = exchange_timing(schedule, cost) if not kinds.isdisjoint(EXCHANGE_KINDS) else None
        self.x_dur = xt.durations if xt else {}
        self.x_partner = xt.partner if xt else {}
        self.x_arrive: dict[tuple[int, int], float] = {}
        self.x_wait: set[tuple[int, int]] = set()
        # Vocabulary collectives (sim/vocab.py): every rank takes part, some wait for completion.
        self.vclock = VocabClock(schedule, cost) if not kinds.isdisjoint(VOCAB_KINDS) else None

    def _meet(self, r: int, i: int, t: float, woken: list[int]) -> float | None:
        """Rank r reached exchange marker i at t: the time both partners are there, or None (wait)."""
        me, other = (r, i), self.x_partner[(r, i)]
        here = self.x_arrive.setdefault(me, t)
        there = self.x_arrive.get(other)
        if there is None:
            self.x_wait.add(me)
            return None
        if other in self.x_wait:
            self.x_wait.discard(other)
            woken.append(other[0])
        return max(here, there)

    def advance(self, r: int) -> list[int]:
        """Run rank r until it blocks on a RECV or finishes; return the ranks its SENDs woke up."""
        # Hot loop: everything it touches is a local name; kinds are tested by identity, commonest first.
        F, B, W, RECV_F, RECV_B = Kind.F, Kind.B, Kind.W, Kind.RECV_F, Kind.RECV_B
        SEND_F, SEND_B = Kind.SEND_F, Kind.SEND_B
        dur, xfer, m, n, x_dur = self.dur, self.xfer, self.m, self.n, self.x_dur
        ready_f, ready_b, wait_f, wait_b = self.ready_f, self.ready_b, self.wait_f, self.wait_b
        prog, st, en = self.progs[r], self.starts[r], self.ends[r]
        i, t, b, size = self.ptr[r], self.clock[r], self.busy[r], len(prog)
        woken: list[int] = []
        while i < size:
            a = prog[i]
            k = a.kind
            if k is F or k is B or k is W:
                d = dur[(k, a.stage, a.seq_slice)]
                if x_dur:
                    d = x_dur.get((r, i), d)
                st[i] = t
                t += d
                b += d
                en[i] = t
            elif k is RECV_F or k is RECV_B:
                u = (a.stage * m + a.microbatch) * n + a.seq_slice
                ready = ready_f[u] if k is RECV_F else ready_b[u]
                if ready < 0:  # block until the matching send wakes this rank
                    (wait_f if k is RECV_F else wait_b)[u] = r
                    break
                st[i] = t
                if ready > t:
                    t = ready
                en[i] = t
            elif k is SEND_F or k is SEND_B:  # non-blocking: the tensor arrives xfer later
                st[i] = en[i] = t
                hop, ready_at, wait = (1, ready_f, wait_f) if k is SEND_F else (-1, ready_b, wait_b)
                u = ((a.stage + hop) * m + a.microbatch) * n + a.seq_slice
                ready_at[u] = t + xfer[(k, a.stage, a.seq_slice)]
                if u in wait:
                    woken.append(wait.pop(u))
            elif k in VOCAB_KINDS:  # lock-step collective over all ranks
                got = self.vclock.reach(r, a, t, woken)  # type: ignore[union-attr]
                if got is None:
                    break
                st[i], en[i], busy = got
                t = en[i]
                b += busy
            elif k in EXCHANGE_KINDS:  # rendezvous: the F/B after it starts when both partners are here
                met = self._meet(r, i, t, woken)
                if met is None:
                    break
                st[i] = en[i] = t = met
            else:
                raise ValueError(f"simulate: rank {r} step {i} has an action of unknown kind: {a}")
            i += 1
        self.ptr[r], self.clock[r], self.busy[r] = i, t, b
        return woken


def simulate(schedule: Schedule, cost: CostModel) -> Timeline:
    """Run ``schedule`` (lowered first if compute-only) against ``cost``; raise DeadlockError (the stuck
    actions in ``.stuck``) if no rank can progress."""
    schedule = lower(schedule)  # idempotent
    with _gc_paused():
        run = _Run(schedule, cost)
        work = list(range(schedule.num_ranks - 1, -1, -1))
        while work:
            work.extend(run.advance(work.pop()))
    stuck = [r for r, prog in enumerate(schedule.ranks) if run.ptr[r] < len(prog)]
    if stuck:
        raise _deadlock(schedule, stuck, run.ptr)
    return Timeline(schedule=schedule, start=run.starts, end=run.ends, busy=tuple(run.busy),
                    makespan=max(run.clock, default=0.0))


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
