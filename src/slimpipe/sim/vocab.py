"""Vocabulary parallelism in the simulator: durations of VE/VH/VB and their lock-step semantics.

A vocabulary collective (schedule/vocab.py) runs on every rank. The simulator times it as:

* every rank reaches it at its own time t_r; VE and VB first do their local part (the masked lookup, the
  scatter-add) and post, so they "arrive" at t_r + compute; VH arrives at t_r;
* it completes ``comm`` after the last arrival (VH: ``compute + comm``, its logits run between the
  broadcast and the reductions, in lock-step on all ranks);
* ranks that wait for it (``schedule.vocab.waits_for``: VH all, VE rank 0, VB none) resume at completion;
  the others continue at their arrival. Busy time counts the compute part only.

Durations (``AnalyticCost.vocab_time`` in sim/cost.py: the pricing is the cost model's) over the t·p vocabulary group, slice j of T_j tokens (b sequences,
T_j/c per CP rank), bf16 messages: VE = reduce of the (T_j/c, h) embedding (2 ring passes); VH = broadcast
of the normalised hidden states (scatter + all-gather, 2 passes), one all-gather of every shard's (max,
Σexp, target) (3 floats per token), the head GEMMs ``3 · 2·T_j·h·V/(t·c·p)`` FLOPs (forward, dW, dX) and
the reduce of dX (2 passes); VB = broadcast of the embedding gradient (2 passes). With a profile, the
compute parts come from the fitted embedding/GEMM/loss times (the head with V/(t·p) rows). The first and
last stage's F/B no longer include any vocabulary work.
"""

from __future__ import annotations

from slimpipe.schedule.actions import VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.semantics import waits_for
from slimpipe.sim.cost import CostModel

__all__ = ["VocabClock"]

_VH = Kind.VH  # a module constant: an Enum class attribute lookup is several times slower (hot path)


class VocabClock:
    """Arrivals and completions of the vocabulary collectives of one simulation."""

    def __init__(self, schedule: Schedule, cost: CostModel) -> None:
        self.p = p = schedule.num_ranks
        timed = getattr(cost, "vocab_time", None)  # cost models without it (uniform): free collectives
        slices = range(schedule.num_slices)
        self.times = {(k, j): (timed(k, j) if timed else (0.0, 0.0)) for k in VOCAB_KINDS for j in slices}
        self._waits = {(k, r): waits_for(k, r, p) for k in VOCAB_KINDS for r in range(p)}
        self._arrived: dict[tuple[Kind, int, int], dict[int, float]] = {}  # key -> {rank: arrival}
        self._done: dict[tuple[Kind, int, int], float] = {}
        self._waiting: dict[tuple[Kind, int, int], list[int]] = {}

    def reach(self, r: int, a: Action, t: float, woken: list[int]) -> tuple[float, float, float] | None:
        """Rank r is at collective ``a`` at time t: (start, end, busy) of the action on this rank, or None
        when it must wait for the others (it is woken through ``woken`` when the collective completes)."""
        kind = a.kind
        key = (kind, a.microbatch, a.seq_slice)
        compute, comm = self.times[(kind, a.seq_slice)]
        done = self._done.get(key)
        if done is None:
            arrivals = self._arrived.setdefault(key, {})
            arrivals.setdefault(r, t if kind is _VH else t + compute)
            if len(arrivals) == self.p:
                lockstep = compute if kind is _VH else 0.0  # VH computes between its collectives
                done = self._done[key] = max(arrivals.values()) + lockstep + comm
                woken.extend(self._waiting.pop(key, ()))
        if not self._waits[(kind, r)]:
            return t, t + compute, compute
        if done is None:
            self._waiting.setdefault(key, []).append(r)
            return None
        return done - compute - comm, done, compute

    def stuck(self) -> str:
        """What the unfinished collectives wait for (deadlock messages)."""
        return "; ".join(f"{k.value}{mb}.{j}: {len(v)} of {self.p} ranks arrived"
                         for (k, mb, j), v in self._arrived.items() if (k, mb, j) not in self._done)
