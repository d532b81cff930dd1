"""When the event engine's run is the checked dry run: program order already meets every same-rank need.

The engine (schedule/engine.py) waits where ranks meet — a RECV for its SEND, a collective for every rank,
an exchanged unit for its partner — and trusts program order for everything a rank needs from itself.
The dry run's rules (schedule/semantics.py: ``deps``, ``vocab_deps``) add waits for data; on a program
where each such dependency is present once, on the same rank, earlier in the program (and an F of stage 0
runs on rank 0, the rank that waits for its VE), those waits never hold a rank back, so both give the same
times. :func:`in_program_order` checks that in one pass; anything else goes to the reference run, which
waits for each dependency itself and reports deadlocks.
"""

from __future__ import annotations

from slimpipe.schedule.actions import NO_STAGE, VOCAB_KINDS, Kind, Schedule
from slimpipe.schedule.semantics import kinds

__all__ = ["in_program_order"]


def in_program_order(schedule: Schedule) -> bool:
    """Every action on the unit grid, once; each same-rank dependency earlier on its rank."""
    p, m, n, num = schedule.num_ranks, schedule.num_microbatches, schedule.num_slices, schedule.num_stages
    last, mn, size = num - 1, m * n, num * m * n
    F, B, W, SEND_F, SEND_B = Kind.F, Kind.B, Kind.W, Kind.SEND_F, Kind.SEND_B
    RECV_F, RECV_B, VE, VH, VB = Kind.RECV_F, Kind.RECV_B, Kind.VE, Kind.VH, Kind.VB
    slot = {F: 0, B: 1, W: 2, SEND_F: 3, SEND_B: 4, RECV_F: 5, RECV_B: 6,
            Kind.XOWN_F: 7, Kind.XHELP_F: 8, Kind.XOWN_B: 9, Kind.XHELP_B: 10}
    owner = [-1] * (11 * size)  # rank that ran each action so far (flat key), -1: not yet
    vocab = not kinds(schedule).isdisjoint(VOCAB_KINDS)
    for r, prog in enumerate(schedule.ranks):
        seen_coll: set[tuple[Kind, int, int]] = set()
        for a in prog:
            k, s, mb, j = a.kind, a.stage, a.microbatch, a.seq_slice
            if not (0 <= mb < m and 0 <= j < n):
                return False
            if k is VE or k is VH or k is VB:
                if s != NO_STAGE or (k, mb, j) in seen_coll:
                    return False
                seen_coll.add((k, mb, j))
                continue
            if not 0 <= s < num:
                return False
            u = (s * m + mb) * n + j
            key = slot[k] * size + u
            if owner[key] != -1:
                return False  # twice
            if k is F:
                if j > 0 and owner[u - 1] != r:
                    return False
                if s > 0 and owner[u - mn if (s - 1) % p == r else 5 * size + u] != r:
                    return False
                if vocab and s == 0 and (r != 0 or (VE, mb, j) not in seen_coll):
                    return False
            elif k is B:
                if owner[u] != r or (j < n - 1 and owner[size + u + 1] != r):
                    return False
                if s < last and owner[size + u + mn if (s + 1) % p == r else 6 * size + u] != r:
                    return False
                if vocab and s == last and (VH, mb, j) not in seen_coll:
                    return False
            elif k is W:
                if owner[size + u] != r:
                    return False
            elif k is SEND_F or k is SEND_B:
                if owner[u if k is SEND_F else size + u] != r:
                    return False
            elif (k is RECV_F and s == 0) or (k is RECV_B and s == last):
                return False  # its SEND cannot exist
            owner[key] = r
    return True
