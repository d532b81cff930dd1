"""Schedule → Schedule passes: lowering to explicit send/recv, and in-flight counts.

``lower`` makes every cross-rank tensor handoff explicit: the runtime executes exactly the lowered
program of its rank, and the simulator and the deadlock check (schedule/dryrun.py) read the same program.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from slimpipe.schedule.actions import Action, Kind, Schedule

__all__ = ["lower", "forward_only", "uniform_duration", "peak_inflight", "inflight_curve", "BACKWARD_KINDS"]

_UNIFORM = {Kind.F: 1.0, Kind.B: 2.0, Kind.W: 1.0}
BACKWARD_KINDS = frozenset({Kind.B, Kind.W, Kind.SEND_B, Kind.RECV_B, Kind.VB, Kind.XOWN_B, Kind.XHELP_B})
"""What an evaluation (forward-only) step drops from a lowered schedule."""


def uniform_duration(action: Action) -> float:
    """The closed-form cost convention: F = 1, B = 2, W = 1, communication free."""
    return _UNIFORM.get(action.kind, 0.0)


def lower(schedule: Schedule) -> Schedule:
    """Add explicit SEND/RECV around every cross-rank stage handoff.

    SEND_F right after an F whose next stage is on another rank; RECV_F right before an F whose input comes
    from another rank (stage 0 has none); SEND_B right after a B whose previous stage is on another rank;
    RECV_B right before a B whose output gradient comes from another rank (the last stage's comes from the
    loss). Same-rank handoffs (p = 1) need nothing. Because every rank runs its forwards (and its
    backwards) in one shared order, sends and receives on each channel come out in the same order.

    An already-lowered schedule is returned unchanged (idempotent; hand-edited communication is left for
    check_comm_matching to judge, not silently rewritten).
    """
    if schedule.is_lowered:
        return schedule
    p, last = schedule.num_ranks, schedule.num_stages - 1
    with _gc_paused():
        ranks = tuple(_lower_program(prog, r, p, last) for r, prog in enumerate(schedule.ranks))
    return schedule.replace_ranks(ranks)


def forward_only(schedule: Schedule) -> Schedule:
    """The forward half of a (lowered, validated) schedule: every backward action removed.

    Forwards keep their order on every rank, so sends and receives still match and the forward
    collectives (VE, VH) still meet in one order; with nothing but downstream dependencies left, a
    schedule that was deadlock-free stays so. What ``evaluate`` runs.
    """
    ranks = tuple(tuple(a for a in prog if a.kind not in BACKWARD_KINDS) for prog in schedule.ranks)
    return schedule.replace_ranks(ranks)


_SET_FIELDS = tuple(getattr(Action, name).__set__ for name in ("stage", "kind", "microbatch", "seq_slice"))


def _lower_program(prog: tuple[Action, ...], r: int, p: int, last: int) -> tuple[Action, ...]:
    """lower for one rank's program. Messages are built field by field through the slots: the frozen
    dataclass __init__ (object.__setattr__ per field) costs 3× as much, and there is one per message."""
    F, B, RECV_F, SEND_F, RECV_B, SEND_B = Kind.F, Kind.B, Kind.RECV_F, Kind.SEND_F, Kind.RECV_B, Kind.SEND_B
    new, (set_stage, set_kind, set_mb, set_slice) = object.__new__, _SET_FIELDS
    out: list[Action] = []
    add = out.append
    for a in prog:
        k = a.kind
        if k is not F and k is not B:
            add(a)
            continue
        st, mb, j = a.stage, a.microbatch, a.seq_slice
        before = st > 0 and (st - 1) % p != r if k is F else st < last and (st + 1) % p != r
        after = st < last and (st + 1) % p != r if k is F else st > 0 and (st - 1) % p != r
        if before:
            msg = new(Action)
            set_stage(msg, st)
            set_kind(msg, RECV_F if k is F else RECV_B)
            set_mb(msg, mb)
            set_slice(msg, j)
            add(msg)
        add(a)
        if after:
            msg = new(Action)
            set_stage(msg, st)
            set_kind(msg, SEND_F if k is F else SEND_B)
            set_mb(msg, mb)
            set_slice(msg, j)
            add(msg)
    return tuple(out)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: the passes allocate hundreds of thousands of acyclic objects
    (actions, tuples, floats) and it would rescan the growing heap many times over, for nothing
    (reference counting frees them). Restores the previous state."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def inflight_curve(schedule: Schedule, rank: int) -> list[int]:
    """Units forwarded but not yet backwarded on ``rank`` after each of its actions (program order)."""
    cur, out = 0, []
    for a in schedule.ranks[rank]:
        cur += 1 if a.kind is Kind.F else -1 if a.kind is Kind.B else 0
        out.append(cur)
    return out


def peak_inflight(schedule: Schedule) -> tuple[int, ...]:
    """Per rank: the most units whose forward ran and whose backward has not (activation held)."""
    return tuple(max(inflight_curve(schedule, r), default=0) for r in range(schedule.num_ranks))
