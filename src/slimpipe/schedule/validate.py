"""The schedule validator: one named check per invariant, each a function raising ScheduleError.

``validate(schedule)`` runs them all, cheapest first. Steps are positions in a rank's program; every error
names its check and prints the rank × step grid with the offending step marked.

Invariants (docs/design.md explains each):
  check_metadata            p ranks listed; p, v, m, n ≥ 1; slice_weights has n positive fractions.
  check_stage_placement     every action of stage s sits on rank s mod p (so each stage on exactly one rank).
  check_counts              every unit (stage, mb, slice) has exactly one F and one B; W, if used at all,
                            exactly once per unit; no action outside the unit grid.
  check_f_before_b          per unit, on its rank: F before B, and W after B.
  check_slice_order         per (stage, mb): forwards in slice order 0..n−1 (the K/V prefix exists) and
                            backwards in reverse order n−1..0 (slice j's dK/dV are complete only after every
                            later slice's backward). FIFO slice backwards pass generic validators and give
                            wrong gradients: this check rejects them.
  check_microbatch_backward_after_forwards
                            the first B of a (stage, mb) after the last F of that (stage, mb).
  check_comm_matching       lowered schedules: each SEND has its RECV on the peer, on the right ranks and
                            sides of their compute; per (channel, src, dst) the sends and the receives list
                            the same units in the same order (NCCL matches p2p in issue order, ignoring tags).
  check_vocab_collectives   schedules with vocabulary collectives (VE/VH/VB, schedule/vocab.py): each
                            once per (mb, slice) on every rank, in one order everywhere, owner sides right.
  check_exchange            schedules with attention-exchange markers (schedule/exchange.py): markers in
                            pairs naming each other's unit, volume ≥ 1, one order per pair of ranks.
  check_pipeline_order      stage s+1's forward after stage s's, backward the other way: a cross-rank
                            property, checked by a dependency-driven dry run of the lowered programs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

from slimpipe.schedule.actions import EXCHANGE_KINDS, VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.dryrun import _dry_run
from slimpipe.schedule.errors import ScheduleError
from slimpipe.schedule.feature_checks import check_exchange, check_vocab_collectives
from slimpipe.schedule.passes import lower

__all__ = [
    "ScheduleError",
    "validate",
    "CHECKS",
    "check_metadata",
    "check_stage_placement",
    "check_counts",
    "check_f_before_b",
    "check_slice_order",
    "check_microbatch_backward_after_forwards",
    "check_comm_matching",
    "check_vocab_collectives",
    "check_exchange",
    "check_pipeline_order",
]

_Key = tuple[Kind, int, int, int]  # (kind, stage, micro-batch, slice)


def _positions(schedule: Schedule, kinds: Collection[Kind]) -> dict[_Key, tuple[int, int]]:
    """(kind, stage, mb, slice) -> (rank, step) of its first occurrence (duplicates: check_counts)."""
    pos: dict[_Key, tuple[int, int]] = {}
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            if a.kind in kinds:
                pos.setdefault((a.kind, a.stage, a.microbatch, a.seq_slice), (r, i))
    return pos


def check_metadata(schedule: Schedule) -> None:
    """p ranks listed; p, v, m, n positive; slice_weights None or n positive fractions summing to 1."""
    s = schedule
    for name, val in (("num_ranks", s.num_ranks), ("virtual_stages", s.virtual_stages),
                      ("num_microbatches", s.num_microbatches), ("num_slices", s.num_slices)):
        if not isinstance(val, int) or val < 1:
            raise ScheduleError("check_metadata", f"{name}={val!r} must be a positive integer", s)
    if len(s.ranks) != s.num_ranks:
        raise ScheduleError(
            "check_metadata",
            f"num_ranks={s.num_ranks} but {len(s.ranks)} rank programs: list one per rank", s,
        )
    w = s.slice_weights
    if w is not None and (len(w) != s.num_slices or min(w) <= 0 or abs(sum(w) - 1) > 1e-6):
        raise ScheduleError(
            "check_metadata",
            f"slice_weights={w} must be num_slices={s.num_slices} positive fractions summing to 1, or None",
            s,
        )


def check_stage_placement(schedule: Schedule) -> None:
    """Every action of stage s sits on rank s mod p (Megatron's interleaved assignment)."""
    p, num_stages = schedule.num_ranks, schedule.num_stages
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            if a.kind in VOCAB_KINDS:  # collectives run on every rank (check_vocab_collectives)
                continue
            if a.kind in EXCHANGE_KINDS:  # exchange markers name the partner's unit (check_exchange)
                continue
            if not 0 <= a.stage < num_stages:
                raise ScheduleError(
                    "check_stage_placement",
                    f"rank {r} step {i}: {a} names stage {a.stage}, outside [0, p·v = {num_stages})",
                    schedule, [(r, i)],
                )
            if a.stage % p != r:
                raise ScheduleError(
                    "check_stage_placement",
                    f"rank {r} step {i}: {a} belongs to stage {a.stage}, which lives on rank "
                    f"{a.stage % p} (stage mod p): move it there",
                    schedule, [(r, i)],
                )


def check_counts(schedule: Schedule) -> None:
    """Exactly one F and one B per unit; W either absent or exactly one per unit; nothing off the grid."""
    s = schedule
    seen: dict[_Key, tuple[int, int]] = {}
    any_w = False
    for r, prog in enumerate(s.ranks):
        for i, a in enumerate(prog):
            if not a.is_compute:
                continue
            any_w |= a.kind is Kind.W
            if not (0 <= a.microbatch < s.num_microbatches and 0 <= a.seq_slice < s.num_slices):
                raise ScheduleError(
                    "check_counts",
                    f"rank {r} step {i}: {a} is outside the unit grid (micro-batch < m={s.num_microbatches}, "
                    f"slice < n={s.num_slices})",
                    s, [(r, i)],
                )
            key = (a.kind, a.stage, a.microbatch, a.seq_slice)
            if key in seen:
                r0, i0 = seen[key]
                raise ScheduleError(
                    "check_counts", f"{a} runs twice: rank {r0} step {i0} and rank {r} step {i}",
                    s, [(r0, i0), (r, i)],
                )
            seen[key] = (r, i)
    kinds = (Kind.F, Kind.B, Kind.W) if any_w else (Kind.F, Kind.B)
    for stage in range(s.num_stages):
        for mb in range(s.num_microbatches):
            for j in range(s.num_slices):
                for kind in kinds:
                    if (kind, stage, mb, j) not in seen:
                        what = "W is used, so every unit needs one" if kind is Kind.W else "one per unit"
                        raise ScheduleError(
                            "check_counts",
                            f"{Action(stage, kind, mb, j)} is missing on rank {stage % s.num_ranks} ({what})",
                            s,
                        )


def check_f_before_b(schedule: Schedule) -> None:
    """Per unit on its rank: F before B, and W (if any) after B."""
    pos = _positions(schedule, (Kind.F, Kind.B, Kind.W))
    for (kind, stage, mb, j), (r, i) in pos.items():
        before = {Kind.B: Kind.F, Kind.W: Kind.B}.get(kind)
        if before is None:
            continue
        other = pos.get((before, stage, mb, j))
        if other is not None and other[1] > i:
            raise ScheduleError(
                "check_f_before_b",
                f"rank {r} step {i}: {Action(stage, kind, mb, j)} runs before "
                f"{Action(stage, before, mb, j)} (step {other[1]}): a unit's {before} must come first",
                schedule, [(r, i), other],
            )


def check_slice_order(schedule: Schedule) -> None:
    """Per (stage, mb): F in slice order 0..n−1; B in reverse slice order n−1..0."""
    last: dict[tuple[Kind, int, int], tuple[int, int]] = {}  # (kind, stage, mb) -> (slice, step) seen last
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            if a.kind not in (Kind.F, Kind.B):
                continue
            key = (a.kind, a.stage, a.microbatch)
            prev = last.get(key)
            if prev is not None:
                ok = a.seq_slice > prev[0] if a.kind is Kind.F else a.seq_slice < prev[0]
                if not ok:
                    why = (
                        "forwards of one (stage, micro-batch) must run in slice order 0..n−1: slice j "
                        "attends to the K/V prefix of slices < j"
                        if a.kind is Kind.F
                        else "backwards of one (stage, micro-batch) must run in reverse slice order n−1..0: "
                        "the K/V gradients of slice j are complete only after every later slice's backward"
                    )
                    raise ScheduleError(
                        "check_slice_order",
                        f"rank {r} step {i}: {a} runs after {Action(a.stage, a.kind, a.microbatch, prev[0])} "
                        f"(step {prev[1]}); {why}",
                        schedule, [(r, i)],
                    )
            last[key] = (a.seq_slice, i)


def check_microbatch_backward_after_forwards(schedule: Schedule) -> None:
    """The first B of a (stage, mb) runs after the last F of that (stage, mb) on its rank."""
    last_f: dict[tuple[int, int], int] = {}
    first_b: dict[tuple[int, int], tuple[int, int, Action]] = {}
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            if a.kind is Kind.F:
                last_f[(a.stage, a.microbatch)] = i
            elif a.kind is Kind.B:
                first_b.setdefault((a.stage, a.microbatch), (r, i, a))
    for key, (r, i, a) in first_b.items():
        f_step = last_f.get(key, -1)
        if f_step > i:
            raise ScheduleError(
                "check_microbatch_backward_after_forwards",
                f"rank {r} step {i}: {a} starts the backward of (stage {key[0]}, micro-batch {key[1]}) "
                f"before its last forward (step {f_step}): a micro-batch's backward needs all its slices",
                schedule, [(r, i), (r, f_step)],
            )


_SEND_RECV = {  # comm kind -> (its compute kind, stage offset of the peer, +1 after / −1 before compute)
    Kind.SEND_F: (Kind.F, +1, +1),
    Kind.RECV_F: (Kind.F, -1, -1),
    Kind.SEND_B: (Kind.B, -1, +1),
    Kind.RECV_B: (Kind.B, +1, -1),
}


def _check_comm_presence(schedule: Schedule) -> None:
    """Each implied SEND/RECV present exactly once, nothing extra, on the right side of its compute."""
    p, last = schedule.num_ranks, schedule.num_stages - 1
    for r, prog in enumerate(schedule.ranks):
        comp: dict[tuple[Kind, int, int, int], int] = {}  # this rank's F/B -> step
        comm: list[int] = []
        for i, a in enumerate(prog):
            if a.kind is Kind.F or a.kind is Kind.B:
                comp[(a.kind, a.stage, a.microbatch, a.seq_slice)] = i
            elif a.kind is not Kind.W and a.kind not in VOCAB_KINDS and a.kind not in EXCHANGE_KINDS:
                comm.append(i)
        seen: dict[tuple[Kind, int, int, int], int] = {}
        for i in comm:
            a = prog[i]
            compute, peer_off, side = _SEND_RECV[a.kind]
            peer = a.stage + peer_off
            ci = comp.get((compute, a.stage, a.microbatch, a.seq_slice))
            if ci is None or not 0 <= peer <= last or peer % p == r:
                raise ScheduleError(
                    "check_comm_matching",
                    f"rank {r} step {i}: {a} has no peer (no such cross-rank stage handoff, or its compute "
                    "action is missing on this rank): remove it or re-run lower()", schedule, [(r, i)],
                )
            key = (a.kind, a.stage, a.microbatch, a.seq_slice)
            if key in seen:
                raise ScheduleError(
                    "check_comm_matching", f"rank {r}: {a} appears twice (steps {seen[key]} and {i})",
                    schedule, [(r, seen[key]), (r, i)],
                )
            seen[key] = i
            if (i - ci) * side < 0:
                raise ScheduleError(
                    "check_comm_matching",
                    f"rank {r} step {i}: {a} must come {'after' if side > 0 else 'before'} {prog[ci]} "
                    f"(step {ci})", schedule, [(r, i), (r, ci)],
                )
        # Every comm action seen is valid and unique, so equal counts mean nothing is missing (with
        # p > 1 every stage handoff crosses ranks: F needs RECV_F unless stage 0 and SEND_F unless last).
        expected = 0 if p == 1 else sum((key[1] > 0) + (key[1] < last) for key in comp)
        if len(seen) == expected:
            continue
        for (kind, st, mb, j), ci in comp.items():
            for comm_kind, (compute, peer_off, _) in _SEND_RECV.items():
                peer = st + peer_off
                crosses = 0 <= peer <= last and peer % p != r
                if compute is kind and crosses and (comm_kind, st, mb, j) not in seen:
                    raise ScheduleError(
                        "check_comm_matching",
                        f"{Action(st, comm_kind, mb, j)} is missing next to {prog[ci]} (rank {r} step {ci}): "
                        "run lower() on the compute-only schedule", schedule, [(r, ci)],
                    )


def check_comm_matching(schedule: Schedule, *, per_pair: bool = False) -> None:
    """Lowered schedules: SEND/RECV complete and placed, and per (channel, src, dst) in the same order.

    Channels: forward activations (SEND_F/RECV_F) and backward gradients (SEND_B/RECV_B). per_pair=True
    demands one order per (src, dst) across both channels: what NCCL matches when activations and
    gradients share one communicator. Only p = 2 with v > 1 puts both channels on one pair, and the
    builders' orders do not always agree there: a runtime must then give each channel its own
    process group (or post receives early), which the per-channel check assumes.
    """
    _check_comm_presence(schedule)
    p = schedule.num_ranks
    # Messages as (kind, sender stage, mb, slice) tuples: cheaper than Actions on 100k-action schedules.
    sends: dict[tuple[str, int, int], list[tuple[Kind, int, int, int]]] = defaultdict(list)
    recvs: dict[tuple[str, int, int], list[tuple[tuple[Kind, int, int, int], int]]] = defaultdict(list)
    fwd, bwd = ("p2p", "p2p") if per_pair else ("forward", "backward")
    for r, prog in enumerate(schedule.ranks):
        for i, a in enumerate(prog):
            k, st, mb, j = a.kind, a.stage, a.microbatch, a.seq_slice
            if k is Kind.SEND_F:
                sends[(fwd, r, (st + 1) % p)].append((k, st, mb, j))
            elif k is Kind.SEND_B:
                sends[(bwd, r, (st - 1) % p)].append((k, st, mb, j))
            elif k is Kind.RECV_F:
                recvs[(fwd, (st - 1) % p, r)].append(((Kind.SEND_F, st - 1, mb, j), i))
            elif k is Kind.RECV_B:
                recvs[(bwd, (st + 1) % p, r)].append(((Kind.SEND_B, st + 1, mb, j), i))
    for (chan, src, dst), got in recvs.items():
        for idx, (want, (have, step)) in enumerate(zip(sends[(chan, src, dst)], got)):
            if want != have:
                raise ScheduleError(
                    "check_comm_matching",
                    f"rank {dst} step {step}: {schedule.ranks[dst][step]} is receive #{idx} on the {chan} "
                    f"channel {src}→{dst}, but send #{idx} there is {Action(want[1], want[0], *want[2:])} "
                    f"(it needs {Action(have[1], have[0], *have[2:])}): NCCL matches point-to-point "
                    "messages in issue order (tags are ignored), so it would receive the wrong tensor",
                    schedule, [(dst, step)],
                )


def check_pipeline_order(schedule: Schedule) -> None:
    """Stage s+1's forward after stage s's, backward the other way, across ranks: a dry run of the lowered
    programs (SEND non-blocking, RECV waits for its SEND) must finish without deadlock."""
    _dry_run(lower(schedule), duration=None, latency=0.0, check="check_pipeline_order")


CHECKS = (
    check_metadata,
    check_stage_placement,
    check_counts,
    check_f_before_b,
    check_slice_order,
    check_microbatch_backward_after_forwards,
    check_comm_matching,
    check_vocab_collectives,
    check_exchange,
    check_pipeline_order,
)
"""Every check, in the order validate runs them (cheap and local first, the dry run last)."""


def validate(schedule: Schedule) -> None:
    """Run every check; raise ScheduleError naming the first that fails. check_comm_matching runs only on
    lowered schedules (compute-only ones are lowered for the dry run)."""
    for check in CHECKS:
        if check is check_comm_matching and not schedule.is_lowered:
            continue
        check(schedule)
