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
    oB, oW, oSF, oSB, oRF, oRB = size, 2 * size, 3 * size, 4 * size, 5 * size, 6 * size
    owner = [-1] * (11 * size)  # rank that ran each action so far (flat key, engine.layout), -1: not yet
    vocab = not kinds(schedule).isdisjoint(VOCAB_KINDS)
    for r, prog in enumerate(schedule.ranks):
        seen = bytearray(3 * mn)  # collectives this rank reached so far, by kind·m·n + mb·n + slice
        for a in prog:
            # identity tests, no dict of kinds: hashing a str-Enum member runs Python code (hot loop)
            k, s, mb, j = a.kind, a.stage, a.microbatch, a.seq_slice
            if not (0 <= mb < m and 0 <= j < n):
                return False
            if k is VE or k is VH or k is VB:
                c = (0 if k is VE else (mn if k is VH else 2 * mn)) + mb * n + j
                if s != NO_STAGE or seen[c]:
                    return False
                seen[c] = 1
                continue
            if not 0 <= s < num:
                return False
            u = (s * m + mb) * n + j
            if k is F:
                key = u
                if j > 0 and owner[u - 1] != r:
                    return False
                if s > 0 and owner[u - mn if (s - 1) % p == r else oRF + u] != r:
                    return False
                if vocab and s == 0 and (r != 0 or not seen[mb * n + j]):  # rank 0 waits for its VE
                    return False
            elif k is B:
                key = oB + u
                if owner[u] != r or (j < n - 1 and owner[key + 1] != r):
                    return False
                if s < last and owner[key + mn if (s + 1) % p == r else oRB + u] != r:
                    return False
                if vocab and s == last and not seen[mn + mb * n + j]:
                    return False
            elif k is SEND_F:
                key = oSF + u
                if owner[u] != r:
                    return False
            elif k is SEND_B:
                key = oSB + u
                if owner[oB + u] != r:
                    return False
            elif k is RECV_F:
                key = oRF + u
                if s == 0:
                    return False  # its SEND cannot exist
            elif k is RECV_B:
                key = oRB + u
                if s == last:
                    return False
            elif k is W:
                key = oW + u
                if owner[oB + u] != r:
                    return False
            else:  # an exchange marker (engine.SLOTS 7..10)
                key = (7 if k is Kind.XOWN_F else 8 if k is Kind.XHELP_F else 9 if k is Kind.XOWN_B else 10) * size + u
            if owner[key] != -1:
                return False  # twice
            owner[key] = r
    return True
