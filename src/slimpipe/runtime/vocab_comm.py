"""PP-group collectives behind the vocabulary actions (VE/VH/VB): torch.distributed or in-process.

A vocabulary action is written once, as a *program*: a generator that yields :class:`Collective` requests
(reduce, broadcast, all-reduce) and receives each result back. A driver runs the programs:

* :class:`DistCollectives` runs VH's requests as blocking collectives on the pipeline's process group, and
  VE's and VB's as point-to-point messages with the root (rank 0): a rank that does not wait for the
  action (``schedule.vocab.waits_for``) only posts an isend, or an irecv whose program is parked until
  ``drain`` (called before each VH, which everyone waits for anyway, and at the end of the step).
* :class:`LocalCollectives` (one per rank of a LocalPipelineRuntime) hands its program to a shared
  :class:`LocalCollectiveHub`; when the last rank of the pipeline has posted its program for an action,
  the hub runs all p programs in lock-step, combining their requests in memory. A rank that waits for the
  action yields in the executor until then, like a RECV with nothing queued.

Every rank posts the same collectives in the same order (the schedule's), which is what both torch
backends need to match them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimpipe.runtime.parallel_state import ParallelState
from slimpipe.runtime.tensor_parallel import TensorParallel, all_gather_seq, reduce_scatter_seq

__all__ = ["Collective", "Program", "DistCollectives", "LocalCollectiveHub", "LocalCollectives", "OPS"]

OPS = ("reduce", "broadcast", "all_gather", "all_gather_seq", "reduce_scatter_seq")


@dataclass(frozen=True, kw_only=True, slots=True)
class Collective:
    """One request of a program."""

    op: str
    """One of OPS: reduce (sum to ``root``), broadcast (from ``root``) over the pipeline; all_gather
    (every vocabulary shard's tensor, stacked in shard order, on every rank of the t·p shards); and with
    tensor parallelism (T > 1 only) all_gather_seq / reduce_scatter_seq along the tokens over the TP group
    (runtime/tensor_parallel.py)."""
    tensor: torch.Tensor | None
    """This rank's contribution (contiguous); None for a broadcast on a non-root rank."""
    root: int = -1
    """Pipeline rank of the reduce destination / broadcast source."""
    shape: tuple[int, ...] = ()
    """Shape of a broadcast received on a non-root rank."""
    dtype: torch.dtype = torch.float32
    """Dtype of a broadcast received on a non-root rank."""
    p2p: bool = False
    """reduce/broadcast as point-to-point messages with the root (VE, VB: ranks that do not wait only
    post); else a blocking collective (VH)."""


Program = Generator[Collective, torch.Tensor | None, None]
"""Yields requests; receives the result (reduce: the sum on the root, None elsewhere)."""


def _step(program: Program, result: torch.Tensor | None, clock: list[float]) -> Collective | None:
    """Resume ``program`` with ``result``; the next request, or None when it finished. Adds its run time
    to ``clock[0]`` (the rank's busy time)."""
    t0 = time.perf_counter()
    try:
        return program.send(result)
    except StopIteration:
        return None
    finally:
        clock[0] += time.perf_counter() - t0


class DistCollectives:
    """Requests over torch.distributed. ``p2p`` requests (VE, VB) are point-to-point messages to or from the
    root on the pipeline's vocabulary group, so a rank that does not wait only posts an isend (or an irecv
    it completes later); the others are blocking collectives on the pipeline group (VH: every rank waits).
    Asynchronous *collectives* would do for the former on NCCL, but gloo runs them on a small worker pool
    where a posted one blocks the next until every rank has joined (measured: VH several times slower)."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state
        # (work, program, receive buffer, clock) of non-waiting programs that need a result
        self._parked: list[tuple[object, Program, torch.Tensor, list[float]]] = []
        self._posted: list[tuple[object, torch.Tensor]] = []  # isends kept alive until drained

    def run(self, key: object, program: Program, *, waits: bool, clock: list[float]) -> None:
        req, result = _step(program, None, clock), None
        while req is not None:
            if req.p2p:
                done, result = self._p2p(req, program, waits, clock)
                if not done:
                    return  # parked until drain()
            else:
                result = self._collective(req)
            req = _step(program, result, clock)

    def _collective(self, req: Collective) -> torch.Tensor | None:
        st = self.state
        mine = req.root == st.pp_rank
        t = req.tensor
        if req.op == "broadcast":
            t = t if mine else torch.empty(req.shape, dtype=req.dtype, device=st.device)
            dist.broadcast(t, src=st.global_rank(req.root), group=st.pp_group)
            return t
        assert t is not None
        if req.op == "reduce":
            dist.reduce(t, dst=st.global_rank(req.root), op=dist.ReduceOp.SUM, group=st.pp_group)
            return t if mine else None
        if req.op in ("all_gather_seq", "reduce_scatter_seq"):
            tp = TensorParallel(group=st.tp_group, size=st.tp, rank=st.tp_rank)
            return (all_gather_seq if req.op == "all_gather_seq" else reduce_scatter_seq)(t, tp)
        out = [torch.empty_like(t) for _ in range(st.pp * st.tp)]  # pp_tp ranks: shard order r·t + i
        dist.all_gather(out, t.contiguous(), group=st.pp_tp_group)
        return torch.stack(out)

    def _p2p(self, req: Collective, program: Program, waits: bool,
             clock: list[float]) -> tuple[bool, torch.Tensor | None]:
        """(finished, result) of a reduce-to-root / broadcast-from-root made of point-to-point messages."""
        st, group = self.state, self.state.vocab_group
        others = [r for r in range(st.pp) if r != req.root]
        if req.root == st.pp_rank:
            assert req.tensor is not None
            if req.op == "broadcast":
                for r in others:
                    work = dist.isend(req.tensor, dst=st.global_rank(r), group=group)
                    self._posted.append((work, req.tensor))
                return True, req.tensor
            total = req.tensor.clone()
            for r in others:  # in rank order: a fixed summation order
                buf = torch.empty_like(total)
                dist.recv(buf, src=st.global_rank(r), group=group)
                total += buf
            return True, total
        if req.op == "reduce":
            assert req.tensor is not None
            work = dist.isend(req.tensor, dst=st.global_rank(req.root), group=group)
            self._posted.append((work, req.tensor))
            return True, None
        buf = torch.empty(req.shape, dtype=req.dtype, device=st.device)
        work = dist.irecv(buf, src=st.global_rank(req.root), group=group)
        if waits:
            work.wait()  # type: ignore[attr-defined]
            return True, buf
        self._parked.append((work, program, buf, clock))
        return False, None

    def complete(self, key: object) -> bool:
        return True  # waiting ranks blocked inside run()

    def begin_step(self) -> None:
        if self._parked or self._posted:
            raise RuntimeError("vocabulary collectives of the previous step were never drained")

    def drain(self) -> None:
        """Finish every parked program and outstanding send, in posting order."""
        parked, self._parked = self._parked, []
        for work, program, buf, clock in parked:
            work.wait()  # type: ignore[attr-defined]
            if _step(program, buf, clock) is not None:
                raise RuntimeError("a parked vocabulary program issued another collective: it must not")
        for work, _ in self._posted:
            work.wait()  # type: ignore[attr-defined]
        self._posted.clear()

    def finish(self) -> None:
        self.drain()


class LocalCollectiveHub:
    """Programs of the p ranks of one in-process pipeline, run together once all p have posted."""

    def __init__(self, p: int) -> None:
        self.p = p
        self._posted: dict[object, dict[int, tuple[Program, list[float]]]] = {}
        self.done: set[object] = set()

    def post(self, key: object, rank: int, program: Program, clock: list[float]) -> None:
        posted = self._posted.setdefault(key, {})
        if rank in posted:
            raise RuntimeError(f"rank {rank} posted the vocabulary collective {key} twice")
        posted[rank] = (program, clock)
        if len(posted) == self.p:
            self._run_all(key, self._posted.pop(key))

    def _run_all(self, key: object, posted: dict[int, tuple[Program, list[float]]]) -> None:
        ranks = sorted(posted)
        reqs = {r: _step(posted[r][0], None, posted[r][1]) for r in ranks}
        while any(q is not None for q in reqs.values()):
            live = [r for r in ranks if reqs[r] is not None]
            ops = {reqs[r].op for r in live}  # type: ignore[union-attr]
            if len(live) != len(ranks) or len(ops) != 1:
                raise RuntimeError(f"vocabulary collective {key}: ranks disagree on the next request "
                                   f"({ {r: None if reqs[r] is None else reqs[r].op for r in ranks} })")
            results = _combine(ops.pop(), {r: reqs[r] for r in live})  # type: ignore[misc]
            reqs = {r: _step(posted[r][0], results[r], posted[r][1]) for r in ranks}
        self.done.add(key)

    def pending(self) -> list[object]:
        return list(self._posted)

    def reset(self) -> None:
        self._posted.clear()
        self.done.clear()


def _combine(op: str, reqs: dict[int, Collective]) -> dict[int, torch.Tensor | None]:
    """In-memory result of one collective for every rank."""
    ranks = sorted(reqs)
    if op == "broadcast":
        root = reqs[ranks[0]].root
        src = reqs[root].tensor
        assert src is not None
        return {r: src if r == root else src.clone() for r in ranks}
    tensors = [reqs[r].tensor for r in ranks]
    if op == "all_gather":
        stacked = torch.stack(tensors)  # type: ignore[arg-type]
        return {r: stacked if i == 0 else stacked.clone() for i, r in enumerate(ranks)}
    total = tensors[0].clone()  # type: ignore[union-attr]
    for t in tensors[1:]:  # reduce: sum in rank order, as the distributed p2p reduce does
        total += t  # type: ignore[operator]
    root = reqs[ranks[0]].root
    return {r: total if r == root else None for r in ranks}


class LocalCollectives:
    """One rank's endpoint on a LocalCollectiveHub."""

    def __init__(self, hub: LocalCollectiveHub, rank: int) -> None:
        self.hub, self.rank = hub, rank

    def run(self, key: object, program: Program, *, waits: bool, clock: list[float]) -> None:
        self.hub.post(key, self.rank, program, clock)

    def complete(self, key: object) -> bool:
        return key in self.hub.done

    def begin_step(self) -> None:
        if self.rank == 0:  # one hub per pipeline: rank 0 starts every step first
            self.hub.reset()

    def drain(self) -> None:
        return None  # programs run when the last rank posts: nothing is parked here

    def finish(self) -> None:
        if self.hub.pending():  # only reachable when a rank's program lacks a collective the others ran
            raise RuntimeError(f"vocabulary collectives never completed: {self.hub.pending()}")


Driver = DistCollectives | LocalCollectives
"""What a rank's VocabRuntime talks to."""
DriverFactory = Callable[[int], Driver]
