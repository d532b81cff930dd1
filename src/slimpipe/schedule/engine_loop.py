"""The event engine's hot loop (schedule/engine.py): a rank runs until it blocks; what unblocks it wakes it.

It is one long method on purpose: every simulated schedule runs through it (243,712 actions at the 2048K
headline, twice with vocabulary parallelism), so everything it touches is a local name, kinds are tested
by identity, commonest first, and tables are flat lists indexed by the engine's flat key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimpipe.schedule.actions import Kind, Schedule
from slimpipe.schedule.semantics import waits_for

__all__ = ["Loop", "Tables"]  # internal: schedule/engine.py


@dataclass(kw_only=True, slots=True)
class Tables:
    """Durations and latencies by flat key, collective pricing by collective key, exchanged durations."""

    dur: list[float | None]
    """Rank time by flat key (F/B/W, SEND/RECV; a collective's entry is unused)."""
    lat: list[float]
    """Latency by flat key of a SEND."""
    comp: list[float]
    """Per-rank compute of a collective, by flat key."""
    comm: list[float]
    """Communication of a collective, by flat key."""
    exchanged: dict[tuple[int, int], float] = field(default_factory=dict)
    """(rank, step) -> duration of an exchanged F/B."""
    comm_time: bool = False
    """Whether any SEND/RECV or exchange marker takes rank time (the simulator's never do)."""


class Loop:
    """Mutable state of one run: per-rank cursors and clocks, arrivals of messages, collectives, markers."""

    def __init__(self, schedule: Schedule, tables: Tables, arrival: bool,
                 partner: dict[tuple[int, int], tuple[int, int]]) -> None:
        m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
        self.m, self.n, self.mn, self.size = m, n, m * n, num * m * n
        self.progs = schedule.ranks
        p = self.p = len(self.progs)
        self.t = tables
        self.arrival = arrival
        # ready_f[u]: when the input of F(u) is usable on its rank; u = (stage·m + mb)·n + slice; -1 = unsent.
        self.ready_f, self.ready_b = [-1.0] * self.size, [-1.0] * self.size
        self.wait_f: dict[int, int] = {}
        self.wait_b: dict[int, int] = {}
        self.starts = tuple([0.0] * len(prog) for prog in self.progs)
        self.ends = tuple([0.0] * len(prog) for prog in self.progs)
        self.ptr, self.clock, self.busy = [0] * p, [0.0] * p, [0.0] * p
        self.partner = partner
        self.x_arrive: dict[tuple[int, int], float] = {}
        self.x_wait: set[tuple[int, int]] = set()
        # Collectives by local key kind·m·n + mb·n + slice (flat key = 11·size + local: engine.SLOTS).
        self.cdone = [-1.0] * (3 * self.mn)  # completion time, −1 = not yet
        self.cmax = [float("-inf")] * (3 * self.mn)  # latest arrival so far
        self.cnt = [0] * (3 * self.mn)  # ranks arrived
        self.cwait: list[list[int] | None] = [None] * (3 * self.mn)  # ranks waiting for completion
        self.posted = [-1] * p  # the collective each rank last arrived at
        self.waits = tuple(tuple(waits_for(k, r, p) for r in range(p)) for k in (Kind.VE, Kind.VH, Kind.VB))
        self.marker_offset = {Kind.XOWN_F: 7 * self.size, Kind.XHELP_F: 8 * self.size,
                              Kind.XOWN_B: 9 * self.size, Kind.XHELP_B: 10 * self.size}

    def _meet(self, r: int, i: int, t: float, woken: list[int]) -> float | None:
        """Rank r reached exchange marker i at t: the time both partners are there, or None (wait)."""
        me, other = (r, i), self.partner[(r, i)]
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
        """Run rank r until it blocks or finishes; return the ranks it woke up."""
        F, B, W, RECV_F, RECV_B = Kind.F, Kind.B, Kind.W, Kind.RECV_F, Kind.RECV_B
        SEND_F, SEND_B, VE, VH, VB = Kind.SEND_F, Kind.SEND_B, Kind.VE, Kind.VH, Kind.VB
        m, n, mn, size, arrival = self.m, self.n, self.mn, self.size, self.arrival
        dur, lat, x_dur, comm_time = self.t.dur, self.t.lat, self.t.exchanged, self.t.comm_time
        comp, comm, cdone, cmax, cnt, cwait = self.t.comp, self.t.comm, self.cdone, self.cmax, self.cnt, self.cwait
        posted, p, coll_base, waits = self.posted, self.p, 11 * size, self.waits
        oB, oW, oSF, oSB, oRF, oRB = size, 2 * size, 3 * size, 4 * size, 5 * size, 6 * size
        ready_f, ready_b, wait_f, wait_b = self.ready_f, self.ready_b, self.wait_f, self.wait_b
        prog, st, en = self.progs[r], self.starts[r], self.ends[r]
        i, t, b, steps = self.ptr[r], self.clock[r], self.busy[r], len(prog)
        woken: list[int] = []
        while i < steps:
            a = prog[i]
            k = a.kind
            if k is F or k is B or k is W:
                u = (a.stage * m + a.microbatch) * n + a.seq_slice
                d = dur[u if k is F else (oB + u if k is B else oW + u)]
                if x_dur:
                    d = x_dur.get((r, i), d)
                st[i] = t
                t += d  # type: ignore[operator]  (None: no duration, TypeError to the caller)
                b += d  # type: ignore[operator]
                en[i] = t
            elif k is RECV_F or k is RECV_B:
                u = (a.stage * m + a.microbatch) * n + a.seq_slice
                ready = ready_f[u] if k is RECV_F else ready_b[u]
                if ready < 0:  # block until the matching send wakes this rank
                    (wait_f if k is RECV_F else wait_b)[u] = r
                    break
                if ready > t:
                    st[i] = ready if arrival else t
                    t = ready
                else:
                    st[i] = t
                if comm_time:
                    t += dur[(oRF if k is RECV_F else oRB) + u]  # type: ignore[operator]
                en[i] = t
            elif k is SEND_F or k is SEND_B:  # non-blocking: the tensor is usable lat later
                u = (a.stage * m + a.microbatch) * n + a.seq_slice
                key = (oSF if k is SEND_F else oSB) + u
                st[i] = t
                if comm_time:
                    t += dur[key]  # type: ignore[operator]
                en[i] = t
                v, ready_at, wait = (u + mn, ready_f, wait_f) if k is SEND_F else (u - mn, ready_b, wait_b)
                ready_at[v] = t + lat[key]
                if v in wait:
                    woken.append(wait.pop(v))
            elif k is VE or k is VH or k is VB:  # a collective over all ranks (inlined: hot with vocab-PP)
                ki = 0 if k is VE else (1 if k is VH else 2)
                c_key = ki * mn + a.microbatch * n + a.seq_slice
                key = coll_base + c_key
                c = comp[key]
                d = cdone[c_key]
                if d < 0.0:
                    if posted[r] != c_key:  # first time here (a woken rank comes back to the same action)
                        posted[r] = c_key
                        at = t if k is VH else t + c
                        if at > cmax[c_key]:
                            cmax[c_key] = at
                        cnt[c_key] += 1
                        if cnt[c_key] == p:  # VH computes between its broadcast and reductions, in lock-step
                            d = cdone[c_key] = cmax[c_key] + (c if k is VH else 0.0) + comm[key]
                            if cwait[c_key]:
                                woken.extend(cwait[c_key])
                                cwait[c_key] = None
                if not waits[ki][r]:  # posts its part and moves on (semantics.waits_for)
                    st[i] = t
                    t += c
                    b += c
                    en[i] = t
                elif d < 0.0:
                    if cwait[c_key] is None:
                        cwait[c_key] = [r]
                    else:
                        cwait[c_key].append(r)
                    break
                else:
                    st[i] = d - c - comm[key]
                    en[i] = t = d
                    b += c
            else:  # an exchange marker: rendezvous, the F/B after it starts when both partners are here
                d = 0.0
                if comm_time:  # a dry run's duration function may give markers time
                    u = (a.stage * m + a.microbatch) * n + a.seq_slice
                    d = dur[self.marker_offset[k] + u]  # type: ignore[assignment]
                met = self._meet(r, i, t + d, woken)
                if met is None:
                    break
                if arrival:  # the dry run's view: the marker ran when reached, its F/B waits
                    st[i], en[i] = t, t + d
                else:
                    st[i] = en[i] = met
                t = met
            i += 1
        self.ptr[r], self.clock[r], self.busy[r] = i, t, b
        return woken
