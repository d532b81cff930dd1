"""PP-group collectives behind the vocabulary actions (VE/VH/VB): torch.distributed or in-process.

A vocabulary action is written once, as a *program*: a generator that yields :class:`Collective` requests
(reduce, broadcast, all-reduce) and receives each result back. A driver runs the programs:

* :class:`DistCollectives` issues each request on the pipeline's process group. A rank that waits for the
  action (``schedule.vocab.waits_for``) blocks on every request; one that does not posts asynchronous
  operations and, if its program needs a result (VB on a non-root rank), parks the program until
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

__all__ = ["Collective", "Program", "DistCollectives", "LocalCollectiveHub", "LocalCollectives", "OPS"]

OPS = ("reduce", "broadcast", "all_reduce_sum", "all_reduce_max")


@dataclass(frozen=True, kw_only=True, slots=True)
class Collective:
    """One request of a program."""

    op: str
    """One of OPS: reduce (sum to ``root``), broadcast (from ``root``), all_reduce_sum / all_reduce_max."""
    tensor: torch.Tensor | None
    """This rank's contribution (contiguous); None for a broadcast on a non-root rank."""
    root: int = -1
    """Pipeline rank of the reduce destination / broadcast source."""
    shape: tuple[int, ...] = ()
    """Shape of a broadcast received on a non-root rank."""
    dtype: torch.dtype = torch.float32
    """Dtype of a broadcast received on a non-root rank."""


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
    """Requests as torch.distributed collectives on the pipeline group of ``state``."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state
        # (work, program, receive buffer, clock) of non-waiting programs that need a result
        self._parked: list[tuple[object, Program, torch.Tensor, list[float]]] = []
        self._posted: list[tuple[object, torch.Tensor]] = []  # async sends kept alive until drained

    def run(self, key: object, program: Program, *, waits: bool, clock: list[float]) -> None:
        st = self.state
        req, result = _step(program, None, clock), None
        while req is not None:
            root = st.global_rank(req.root) if req.root >= 0 else -1
            mine = req.root == st.pp_rank
            t = req.tensor
            if req.op == "broadcast" and not mine:
                t = torch.empty(req.shape, dtype=req.dtype, device=st.device)
            assert t is not None
            if req.op == "reduce":
                work = dist.reduce(t, dst=root, op=dist.ReduceOp.SUM, group=st.pp_group, async_op=True)
            elif req.op == "broadcast":
                work = dist.broadcast(t, src=root, group=st.pp_group, async_op=True)
            else:
                op = dist.ReduceOp.MAX if req.op == "all_reduce_max" else dist.ReduceOp.SUM
                work = dist.all_reduce(t, op=op, group=st.pp_group, async_op=True)
            needs_result = req.op.startswith("all_reduce") or (req.op == "reduce") == mine
            if waits:
                work.wait()  # type: ignore[attr-defined]
                result = t if (needs_result or req.op == "broadcast") else None
            elif needs_result:  # a non-waiting rank that needs remote data: resume it at drain()
                self._parked.append((work, program, t, clock))
                return
            else:  # its own data went out: keep the tensor alive, carry on
                self._posted.append((work, t))
                result = t if req.op == "broadcast" else None
            req = _step(program, result, clock)

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
    """In-memory result of one collective for every rank (sums in rank order, like a reduction tree
    would in some order: equal up to floating-point summation order)."""
    ranks = sorted(reqs)
    if op == "broadcast":
        root = reqs[ranks[0]].root
        src = reqs[root].tensor
        assert src is not None
        return {r: src if r == root else src.clone() for r in ranks}
    tensors = [reqs[r].tensor for r in ranks]
    total = tensors[0].clone()  # type: ignore[union-attr]
    for t in tensors[1:]:
        if op == "all_reduce_max":
            torch.maximum(total, t, out=total)  # type: ignore[arg-type]
        else:
            total += t  # type: ignore[operator]
    if op == "reduce":
        root = reqs[ranks[0]].root
        return {r: total if r == root else None for r in ranks}
    return {r: total if i == 0 else total.clone() for i, r in enumerate(ranks)}


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
