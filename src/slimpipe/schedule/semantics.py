"""What waits for what: the dependency semantics every engine and check of a schedule shares.

* :func:`deps` — the data a lowered action waits for: F its input (the previous stage's F on this rank, else
  its RECV_F) and the K/V of the previous slice; B its F, its output gradient (the next stage's B or its
  RECV_B) and the dK/dV of the next slice; W its B; SEND its compute; RECV its SEND (latency applies).
* vocabulary collectives (VE/VH/VB, schedule/vocab.py places them): :func:`vocab_deps` (F of stage 0 needs
  its VE, B of the last stage its VH) and :func:`waits_for` (which ranks block until a collective
  completes: VH all, VE rank 0, VB none; it completes once every rank reached it).
* attention-exchange pairs (markers XOWN_*/XHELP_* right before the paired F or B, schedule/exchange.py adds
  them): :func:`exchanges` (the pairs), :func:`exchange_waits` (an exchanged F/B waits for its partner's
  marker: the rendezvous).

The event engine (schedule/engine*.py: dry run, validate, placement, simulator), the reference dry run
(schedule/dryrun.py) and the checks (validate.py, feature_checks.py) read the
rules here, so there is one definition of each. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from slimpipe.schedule.actions import EXCHANGE_KINDS, NO_STAGE, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.errors import ScheduleError

__all__ = [
    "Key", "deps", "kinds", "has_vocab", "vocab_deps", "waits_for", "has_exchange", "Exchange", "exchanges",
    "exchange_volume", "exchange_waits", "marked_units", "action_key", "MARKERS", "COLLECTIVE_ORDER",
]

Key = tuple[Kind, int, int, int]
"""(kind, stage, micro-batch, slice): an action's identity, the engines' key."""
_KIND = attrgetter("kind")


def deps(a: Action, r: int, p: int, last: int, n: int) -> list[Key]:
    """What action a (on rank r) waits for. A RECV's dependency is its SEND (latency applies)."""
    k, st, mb, j = a.kind, a.stage, a.microbatch, a.seq_slice
    if k in VOCAB_KINDS:  # their data dependencies: vocab_deps
        return []
    if k is Kind.F:
        d: list[Key] = []
        if st > 0:  # the activation from the previous stage
            d.append((Kind.F, st - 1, mb, j) if (st - 1) % p == r else (Kind.RECV_F, st, mb, j))
        if j > 0:  # the K/V prefix of the earlier slice
            d.append((Kind.F, st, mb, j - 1))
        return d
    if k is Kind.B:
        d = [(Kind.F, st, mb, j)]
        if st < last:  # the output gradient from the next stage
            d.append((Kind.B, st + 1, mb, j) if (st + 1) % p == r else (Kind.RECV_B, st, mb, j))
        if j < n - 1:  # the dK/dV contributions of the later slice
            d.append((Kind.B, st, mb, j + 1))
        return d
    if k is Kind.W:
        return [(Kind.B, st, mb, j)]
    if k is Kind.SEND_F:
        return [(Kind.F, st, mb, j)]
    if k is Kind.SEND_B:
        return [(Kind.B, st, mb, j)]
    if k is Kind.RECV_F:
        return [(Kind.SEND_F, st - 1, mb, j)]
    if k in EXCHANGE_KINDS:  # no wait here: the F/B after a marker waits for the partner's (exchange_waits)
        return []
    return [(Kind.SEND_B, st + 1, mb, j)]  # RECV_B


def kinds(schedule: Schedule) -> set[Kind]:
    """Every action kind the schedule uses (one C-level pass: Kind hashes as its str)."""
    kinds: set[Kind] = set()
    for prog in schedule.ranks:
        kinds.update(map(_KIND, prog))
    return kinds


def has_vocab(schedule: Schedule) -> bool:
    """Whether the schedule carries vocabulary collectives."""
    return not kinds(schedule).isdisjoint(VOCAB_KINDS)


def vocab_deps(a: Action, last: int) -> list[Key]:
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


COLLECTIVE_ORDER = {Kind.VE: 0, Kind.VH: 1, Kind.VB: 2}
"""Tie-break between collectives due at the same time (placement, and the order of error messages)."""


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


# marker kind -> (compute kind it precedes, owner?, the partner's marker kind)
MARKERS = {
    Kind.XOWN_F: (Kind.F, True, Kind.XHELP_F), Kind.XHELP_F: (Kind.F, False, Kind.XOWN_F),
    Kind.XOWN_B: (Kind.B, True, Kind.XHELP_B), Kind.XHELP_B: (Kind.B, False, Kind.XOWN_B),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Exchange:
    """One exchange between two concurrent units of different ranks."""

    owner: Action
    """The owner's F (or B): the longer prefix; it hands the attention of its earliest slices over."""
    helper: Action
    """The helper's concurrent F (or B): it computes the owner's moved block inside its own unit."""
    owner_rank: int
    """Pipeline rank running ``owner``."""
    helper_rank: int
    """Pipeline rank running ``helper``."""
    volume: int
    """Slices of the owner's K/V prefix (its earliest ones) whose attention the helper computes, ≥ 1."""
    owner_step: int
    """Position of ``owner`` in its rank's program."""
    helper_step: int
    """Position of ``helper`` in its rank's program."""
    owner_marker: int
    """Position of the owner's marker (XOWN_F/XOWN_B) in its rank's program."""
    helper_marker: int
    """Position of the helper's marker (XHELP_F/XHELP_B) in its rank's program."""


def exchange_volume(owner_slice: int, helper_slice: int, threshold: int) -> int:
    """trunc((j_owner + j_helper)/2 − j_helper) slices, clipped to ``threshold`` (0: no clip)."""
    vol = (owner_slice - helper_slice) // 2 if owner_slice >= helper_slice else 0
    return min(vol, threshold) if threshold > 0 else vol


def has_exchange(schedule: Schedule) -> bool:
    xo_f, xh_f = Kind.XOWN_F, Kind.XHELP_F  # every exchange has an F or a B marker on some rank
    xo_b, xh_b = Kind.XOWN_B, Kind.XHELP_B
    return any(a.kind is xo_f or a.kind is xh_f or a.kind is xo_b or a.kind is xh_b
               for prog in schedule.ranks for a in prog)


def marked_units(schedule: Schedule) -> dict[tuple[int, int], tuple[int, Action]]:
    """(rank, marker step) -> (step, action) of the F/B the marker precedes, which must be the very next
    action: a marker stands for "this unit is ready", which the rendezvous relies on (a collective or a
    RECV between the two could stop one partner while the other already waits inside its unit)."""
    own = {}
    xo_f, xh_f, xo_b = Kind.XOWN_F, Kind.XHELP_F, Kind.XOWN_B
    xh_b = Kind.XHELP_B
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            k = a.kind  # identity tests: hashing a str-Enum member calls Python code (hot loop)
            if not (k is xo_f or k is xh_f or k is xo_b or k is xh_b):
                continue
            want = MARKERS[k][0]
            nxt = prog[i + 1] if i + 1 < len(prog) else None
            if nxt is None or nxt.kind is not want:
                raise _error(f"rank {r} step {i}: {a} must come right before its own {want.value} (next "
                             f"action: {nxt}): re-run add_exchange after any pass that inserts actions",
                             schedule, [(r, i)])
            own[(r, i)] = (i + 1, nxt)
    return own


def _error(message: str, schedule: Schedule, marks=()) -> ScheduleError:
    return ScheduleError("check_exchange", message, schedule, marks)


def action_key(r: int, a: Action) -> tuple[int, int, str, int, int]:
    """Hash key of an action on a rank (the kind's str value: hashing a str-Enum member runs Python code)."""
    return (r, a.stage, a.kind.value, a.microbatch, a.seq_slice)


def exchanges(schedule: Schedule,
              own: dict[tuple[int, int], tuple[int, Action]] | None = None) -> list[Exchange]:
    """Every exchange of a marked schedule (owner-side markers, in rank then program order); checks that
    each marker has its counterpart (check_exchange checks the rest). ``own``: marked_units, if known."""
    if own is None:
        own = marked_units(schedule)
    if not own:
        return []
    p, threshold = schedule.num_ranks, schedule.meta.attn_balance
    # (rank, marker) -> (marker step, own step, own action)
    where = {action_key(r, schedule.ranks[r][i]): (i, k, a) for (r, i), (k, a) in own.items()}
    out = []
    for (r, i), (k, a) in sorted(own.items()):
        marker = schedule.ranks[r][i]
        _, is_owner, partner_kind = MARKERS[marker.kind]
        pr = marker.stage % p
        mate = where.get((pr, a.stage, partner_kind.value, a.microbatch, a.seq_slice))
        partner_unit = Action(marker.stage, a.kind, marker.microbatch, marker.seq_slice)
        if pr == r or mate is None or action_key(pr, mate[2]) != action_key(pr, partner_unit):
            raise _error(f"rank {r} step {i}: {marker} before {a} has no matching "
                         f"{Action(a.stage, partner_kind, a.microbatch, a.seq_slice)} right before "
                         f"{partner_unit} on rank {pr}: markers come in pairs naming each other's unit",
                         schedule, [(r, i)])
        if not is_owner:
            continue
        vol = exchange_volume(a.seq_slice, partner_unit.seq_slice, threshold)
        if vol < 1:
            raise _error(f"rank {r} step {i}: {marker} makes {a} an owner of a volume-{vol} exchange: the "
                         "owner needs a longer prefix than its helper (by ≥ 2 slices)", schedule, [(r, i)])
        out.append(Exchange(owner=a, helper=mate[2], owner_rank=r, helper_rank=pr, volume=vol, owner_step=k,
                            helper_step=mate[1], owner_marker=i, helper_marker=mate[0]))
    return out


def exchange_waits(schedule: Schedule) -> dict[tuple[int, int], list[Key]]:
    """(rank, step of an exchanged F/B) -> the partner's marker it waits for: the dry run's rendezvous.

    The owner's F(U_o) waits until the helper reached ``XHELP_F(U_o)`` and the helper's F(U_h) until the
    owner reached ``XOWN_F(U_h)``; markers themselves take no time and wait for nothing.
    """
    waits: dict[tuple[int, int], list[Key]] = {}
    if not has_exchange(schedule):
        return waits
    for (r, i), (k, a) in marked_units(schedule).items():
        partner_kind = MARKERS[schedule.ranks[r][i].kind][2]
        waits[(r, k)] = [(partner_kind, a.stage, a.microbatch, a.seq_slice)]
    return waits
