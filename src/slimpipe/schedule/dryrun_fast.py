"""The fast dry run: schedule/dryrun.py's reference run with actions keyed by a flat integer index and
the dependencies inlined — the same times, several times faster. Every simulated vocab-parallel schedule
is dry-run once to place its collectives (243,712 actions at the 2048K headline), so this loop is hot:
it is one long function on purpose (locals, no calls per action). Deadlocks and anything it cannot
index fall back to the reference run, which builds the error.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from slimpipe.schedule.actions import EXCHANGE_KINDS, NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.passes import _UNIFORM, uniform_duration
from slimpipe.schedule.semantics import exchange_waits, waits_for

__all__: list[str] = []  # internal: used by schedule/dryrun.py


class _Fallback(Exception):
    """An action the fast dry run cannot index (off the unit grid, a collective with a stage, a RECV whose
    SEND cannot exist, no duration for its (kind, stage, slice)): the reference run decides."""


# Flat index ("key") of an action: slot·U + unit (U = stages·m·n, unit = (stage·m + mb)·n + slice);
# collectives after them at len(_SLOTS)·U + kind·m·n + mb·n + slice.
_SLOTS = (Kind.F, Kind.B, Kind.W, Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B,
          Kind.XOWN_F, Kind.XHELP_F, Kind.XOWN_B, Kind.XHELP_B)
_VOCAB_SLOTS = (Kind.VE, Kind.VH, Kind.VB)
_KIND = attrgetter("kind")


def _layout(schedule: Schedule) -> tuple[dict[Kind, int], int]:
    """(offset of each kind's keys, number of keys)."""
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    U = num * m * n
    offset = {k: i * U for i, k in enumerate(_SLOTS)}
    offset.update({k: len(_SLOTS) * U + i * m * n for i, k in enumerate(_VOCAB_SLOTS)})
    return offset, len(_SLOTS) * U + len(_VOCAB_SLOTS) * m * n


def _key(a: Action, schedule: Schedule, offset: dict[Kind, int]) -> int:
    """The flat index of ``a`` (raises _Fallback off the grid)."""
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    vocab = a.kind in VOCAB_KINDS
    if not (0 <= a.microbatch < m and 0 <= a.seq_slice < n) or (
            a.stage != NO_STAGE if vocab else not 0 <= a.stage < num):
        raise _Fallback
    return offset[a.kind] + ((0 if vocab else a.stage * m) + a.microbatch) * n + a.seq_slice


def _key_durations(schedule: Schedule, duration: Callable[[Action], float] | None,
                   table: dict[tuple[Kind, int, int], float] | None) -> list[float | None]:
    """Duration by flat index: from ``table`` ((kind, stage, slice) -> duration; None where it has
    none), uniform_duration's constants, or ``duration`` asked for every action."""
    offset, size = _layout(schedule)
    m, n, num = schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    if table is not None:
        out: list[float | None] = [None] * size
        for (kind, st, j), d in table.items():
            if kind in VOCAB_KINDS and st == NO_STAGE and 0 <= j < n:
                out[offset[kind] + j: offset[kind] + m * n: n] = [d] * m  # every micro-batch
            elif kind not in VOCAB_KINDS and 0 <= st < num and 0 <= j < n:
                base = offset[kind] + st * m * n + j
                out[base: base + m * n: n] = [d] * m
        return out
    if duration is None or duration is uniform_duration:
        U, uniform = num * m * n, []
        for k in _SLOTS:
            uniform += [_UNIFORM.get(k, 0.0)] * U
        return uniform + [0.0] * (size - len(uniform))
    out = [None] * size
    for prog in schedule.ranks:
        for a in prog:
            out[_key(a, schedule, offset)] = duration(a)
    return out


def _exchange_keys(schedule: Schedule, offset: dict[Kind, int]) -> list[dict[int, int]]:
    """Per rank, step of an exchanged F/B -> flat index of the partner marker it waits for."""
    per_rank: list[dict[int, int]] = [{} for _ in schedule.ranks]
    for (r, i), keys in exchange_waits(schedule).items():
        (kind, st, mb, j), = keys
        per_rank[r][i] = _key(Action(st, kind, mb, j), schedule, offset)
    return per_rank


Times = tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...], float]
"""(start, end, makespan) as DryRunResult holds them."""


def _fast_dry_run(schedule: Schedule, durk: list[float | None], latency: float) -> Times | None:
    """_dry_run_generic with integer keys and the dependencies inlined: the same times, several times
    faster (the placement passes dry-run every simulated schedule). ``durk``: durations by flat index.
    None on deadlock."""
    p, m, n, num = schedule.num_ranks, schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    last, mn = num - 1, m * n
    F, B, RF, RB, SF, SB = Kind.F, Kind.B, Kind.RECV_F, Kind.RECV_B, Kind.SEND_F, Kind.SEND_B
    offset, size = _layout(schedule)
    oB, oRF, oRB, oSF, oSB = offset[B], offset[RF], offset[RB], offset[SF], offset[SB]
    oVE, oVH = offset[Kind.VE], offset[Kind.VH]
    kinds: set[Kind] = set()
    for prog in schedule.ranks:
        kinds.update(map(_KIND, prog))
    vocab = not kinds.isdisjoint(VOCAB_KINDS)
    xkeys = _exchange_keys(schedule, offset) if not kinds.isdisjoint(EXCHANGE_KINDS) else None
    progs = schedule.ranks
    start = [[0.0] * len(prog) for prog in progs]
    end = [[0.0] * len(prog) for prog in progs]
    cursor, clock = [0] * p, [0.0] * p
    done: list[float | None] = [None] * size  # end time of each action, by key
    waiting: list[list[int] | None] = [None] * size  # ranks blocked on each key
    arrived: dict[int, dict[int, float]] = {}
    ready = list(range(p))
    while ready:
        r = ready.pop()
        prog, st_r, en_r = progs[r], start[r], end[r]
        xk = xkeys[r] if xkeys else None
        i, t_rank, steps = cursor[r], clock[r], len(prog)
        while i < steps:
            a = prog[i]
            k, s, mb, j = a.kind, a.stage, a.microbatch, a.seq_slice
            if not (0 <= mb < m and 0 <= j < n):
                raise _Fallback
            if vocab and k in VOCAB_KINDS:  # a collective: done once every rank reached it (as the reference)
                if s != NO_STAGE:
                    raise _Fallback
                key = offset[k] + mb * n + j
                d = durk[key]
                if d is None:
                    raise _Fallback
                here = arrived.setdefault(key, {})
                here[r] = t_rank
                if done[key] is None and len(here) == p:
                    done[key] = max(here.values()) + d
                    ready.extend(waiting[key] or ())
                    waiting[key] = None
                if not waits_for(k, r, p):
                    st_r[i] = en_r[i] = t_rank
                elif done[key] is None:
                    waiting[key] = (waiting[key] or []) + [r]
                    break
                else:
                    t_rank = done[key]
                    st_r[i], en_r[i] = t_rank - d, t_rank
                i += 1
                continue
            if not 0 <= s < num:
                raise _Fallback
            u = (s * m + mb) * n + j
            # deps: what the action waits for, in the reference's order (_deps, vocab_deps, exchange)
            t = t_rank
            if k is F:
                key = u
                if s > 0:
                    d = u - mn if (s - 1) % p == r else oRF + u
                    deps = (d, u - 1) if j > 0 else (d,)
                else:
                    deps = (u - 1,) if j > 0 else ()
                if vocab and s == 0:
                    deps += (oVE + mb * n + j,)
            elif k is B:
                key = oB + u
                if s < last:
                    d = oB + u + mn if (s + 1) % p == r else oRB + u
                    deps = (u, d, key + 1) if j < n - 1 else (u, d)
                else:
                    deps = (u, key + 1) if j < n - 1 else (u,)
                if vocab and s == last:
                    deps += (oVH + mb * n + j,)
            elif k is SF or k is SB or k is RF or k is RB:  # one dependency: its compute, or its SEND
                if k is SF:
                    key, d = oSF + u, u
                elif k is SB:
                    key, d = oSB + u, oB + u
                elif s == (0 if k is RF else last):
                    raise _Fallback
                else:
                    key, d = (oRF + u, oSF + u - mn) if k is RF else (oRB + u, oSB + u + mn)
                e = done[d]
                if e is None:
                    waiting[d] = (waiting[d] or []) + [r]
                    break
                if k is RF or k is RB:  # a message is usable latency after its SEND
                    e += latency
                if e > t:
                    t = e
                deps = ()  # its one dependency is met (and no exchange wait precedes a message)
            else:  # W after its B; exchange markers wait for nothing
                key = offset[k] + u
                deps = (oB + u,) if k is Kind.W else ()
            if xk and i in xk:
                deps += (xk[i],)
            for d in deps:
                e = done[d]
                if e is None:
                    break
                if e > t:
                    t = e
            else:
                d = durk[key]
                if d is None:
                    raise _Fallback
                t_rank = t + d
                st_r[i], en_r[i] = t, t_rank
                done[key] = t_rank
                if waiting[key]:
                    ready.extend(waiting[key])
                    waiting[key] = None
                i += 1
                continue
            waiting[d] = (waiting[d] or []) + [r]
            break
        cursor[r], clock[r] = i, t_rank
    if any(i < len(prog) for i, prog in zip(cursor, progs)):
        return None
    return tuple(map(tuple, start)), tuple(map(tuple, end)), max(clock, default=0.0)
