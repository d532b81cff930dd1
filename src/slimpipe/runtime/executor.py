"""Executes one rank's lowered program through a dispatch table Kind → handler.

Convention used below: a *unit* key is ``(stage, micro-batch, slice)``. Per step the executor keeps:

* ``_inputs[unit]``: the input of F(unit), from RECV_F or from the same rank's upstream F (p = 1);
* ``_held[unit] = (input leaf, output)`` between F(unit) and B(unit);
* ``_to_send_f[unit]`` / ``_to_send_b[unit]``: output / input-gradient waiting for SEND_F / SEND_B;
* ``_douts[unit]``: the output gradient of B(unit), from RECV_B or the same rank's downstream B.

The transport is the only thing that differs between the distributed and the local runtime. ``run`` is a
generator that yields while the next RECV cannot complete, so the local runtime can interleave ranks; the
distributed transport's RECV blocks instead and the generator never yields. No ordering logic lives here:
the program order is the schedule's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import record_function

from slimpipe.schedule.actions import VOCAB_KINDS, Action, Kind, Schedule
from slimpipe.schedule.format import to_grid
from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.documents import StepDocs
from slimpipe.runtime.exchange import RankExchange
from slimpipe.runtime.kv import KVStore
from slimpipe.runtime.memory import MemoryTracker
from slimpipe.runtime.offload import OffloadConfig, Offloader
from slimpipe.runtime.p2p import Transport
from slimpipe.runtime.recompute import check_recompute
from slimpipe.runtime.result import PipelineError, TraceEvent
from slimpipe.runtime.routing import RoutingBook
from slimpipe.runtime.vocab import VocabRuntime
from slimpipe.runtime.stage import RankModel, StageInfo, slice_bounds, stage_forward

__all__ = ["RankExecutor", "COMPUTE"]

log = logging.getLogger(__name__)

COMPUTE = frozenset({Kind.F, Kind.B, Kind.W})
Unit = tuple[int, int, int]


class RankExecutor:
    """One pipeline rank: its model parts, its program, and the per-step state between actions."""

    def __init__(self, *, rank: int, schedule: Schedule, model: RankModel, stages: list[StageInfo],
                 transport: Transport, hidden: int, device: torch.device, dtype: torch.dtype,
                 masks: MaskCache | None = None, exchange: RankExchange | None = None,
                 vocab: VocabRuntime | None = None, recompute: str = "none",
                 offload: OffloadConfig | None = None, seq_shards: int = 1,
                 cp: ContextParallel | None = None) -> None:
        self.rank, self.schedule, self.model = rank, schedule, model
        for block in model.layers.values():
            check_recompute(recompute, block)
        self.recompute = recompute  # activation recompute mode (runtime/recompute.py)
        self.seq_shards = seq_shards  # T: sequence parallelism splits a slice's tokens over the TP ranks
        self.program = schedule.ranks[rank]
        self.stages = {st.stage: st for st in stages}
        self.transport, self.hidden, self.device, self.dtype = transport, hidden, device, dtype
        self.masks = masks or MaskCache()
        self.last_stage = schedule.num_stages - 1
        self.handlers: dict[Kind, Callable[[Action], None]] = {
            Kind.F: self._forward, Kind.B: self._backward,
            Kind.SEND_F: self._send_f, Kind.RECV_F: self._recv_f,
            Kind.SEND_B: self._send_b, Kind.RECV_B: self._recv_b,
        }
        self.exchange = exchange  # attention context exchange (runtime/exchange.py): marker handlers + hooks
        if exchange is not None:
            self.handlers.update(exchange.handlers())
        self.cp = cp  # context parallelism (runtime/context_parallel.py): zig-zag tokens, CP attention
        self.vocab = vocab  # vocabulary parallelism (runtime/vocab.py): VE/VH/VB handlers
        if vocab is not None:
            self.handlers.update(vocab.bind(self))
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.tracker = MemoryTracker(self._excluded)
        # Activation offload (runtime/offload.py): boxes saved tensors, copies them out after F and back
        # one backward ahead; None when α = 0.
        self.offload = None if offload is None or not offload.ratio else Offloader(
            offload, self.program, device, self.tracker.moved_out)
        self.store: KVStore | None = None
        self.routing = RoutingBook()  # MoE load-balancing statistics per (layer, micro-batch)
        self.step = 0
        self.training = True  # False in a forward-only step (evaluate): nothing is kept for a backward
        self._program = self.program
        self.trace: list[TraceEvent] = []
        self.busy_s = 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    # ---- step lifecycle -------------------------------------------------------------------------
    def begin_step(self, step: int, tokens: torch.Tensor, normaliser: float, *,
                   program: tuple[Action, ...] | None = None, docs: StepDocs | None = None) -> None:
        """tokens (m, s+1) on this rank's device; normaliser = loss-taking labels of the global batch.
        ``program``: a forward-only program to run instead of the schedule's (an evaluation step, under
        no_grad). ``docs``: packed documents (document-causal attention, masked labels, positions).

        ``ids``/``labels`` (m, s') are the tokens this rank feeds and predicts, ``bounds`` the slices in their
        rows: the sequence (s' = s), or this CP rank's zig-zag pieces of every slice (s' = s/c)."""
        if docs is not None and (self.exchange is not None or self.cp is not None):
            raise ValueError("packed documents run without the attention context exchange and without context "
                             "parallelism: build the runtime with attn_balance=0 and cp=1")
        self.step, self.tokens, self.normaliser = step, tokens, float(normaliser)
        self.docs = docs
        self.training = program is None
        self._program = self.program if program is None else program
        self.bounds = slice_bounds(tokens.size(1) - 1, self.schedule.slice_fractions())
        if self.cp is not None:
            self.bounds = self.cp.begin_step(self.bounds, tokens.device)
            self.ids, self.labels = self.cp.take(tokens)
        else:  # packed documents: −100 where the next token opens another document (no loss there)
            self.ids, self.labels = tokens[:, :-1], tokens[:, 1:] if docs is None else docs.labels
        self.store = KVStore(self.bounds, self.masks, self.recompute, training=self.training, cp=self.cp,
                             docs=docs)
        cp = None if self.cp is None else self.cp.comm
        self.routing.begin_step(self.bounds[-1], self.normaliser, cp_size=1 if cp is None else cp.size,
                                cp_group=None if cp is None else cp.group)
        if self.exchange is not None:
            self.exchange.begin_step(self.bounds)
        self._token_ptrs = {t.untyped_storage().data_ptr() for t in (tokens, self.ids, self.labels)}
        self._inputs: dict[Unit, torch.Tensor] = {}
        self._held: dict[Unit, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._to_send_f: dict[Unit, torch.Tensor] = {}
        self._to_send_b: dict[Unit, torch.Tensor] = {}
        self._douts: dict[Unit, torch.Tensor] = {}
        self._head_in: dict[tuple[int, int], torch.Tensor] = {}  # (mb, slice) -> last stage output, for VH
        self._embed_grad: dict[tuple[int, int], torch.Tensor] = {}  # (mb, slice) -> stage-0 input grad, VB
        self.tracker.reset()
        if self.offload is not None and self.training:
            self.offload.begin_step()
        self.trace, self.busy_s, self.executed = [], 0.0, 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        firsts, self._next_recv = _receive_chains(self._program)
        for a in firsts:  # each channel's first receive, posted before any compute (transport docstring)
            self._post(a)
        if self.vocab is not None:
            self.vocab.begin_step()

    def run(self) -> Iterator[Action]:
        """Execute the program in order; yields the blocked action while a RECV cannot complete yet."""
        for idx, action in enumerate(self._program):
            while action.kind in (Kind.RECV_F, Kind.RECV_B) and not self.transport.ready(
                    _channel(action), self._peer(action)):
                yield action
            self._execute(idx, action)
            while action.kind in VOCAB_KINDS and not self.vocab.complete(action):  # type: ignore[union-attr]
                yield action  # in-process collectives: the other ranks have not posted theirs yet

    def end_step(self) -> None:
        """Check nothing is left over (K/V state, unconsumed tensors) and wait for outstanding sends."""
        try:
            if self.vocab is not None:  # parked collectives first: they consume stashed gradients
                self.vocab.end_step()
            assert self.store is not None
            self.store.check_drained()
            stash = {"inputs": self._inputs, "held": self._held, "to_send_f": self._to_send_f,
                     "to_send_b": self._to_send_b, "douts": self._douts, "head_in": self._head_in,
                     "embed_grad": self._embed_grad}
            left = {name: sorted(d) for name, d in stash.items() if d}
            if left:
                raise RuntimeError(f"tensors left over at the end of the step: {left}")
            self.transport.finish()
            if self.offload is not None and self.training:
                self.offload.end_step()
            if self.exchange is not None:
                self.exchange.end_step()
            if self.training:  # MoE layers' load-balancing loss (an evaluation reports cross-entropy only)
                self.loss_sum += self.routing.aux_loss(self.device)
        except Exception as exc:
            raise self._error(len(self._program), None, exc) from exc

    # ---- dispatch -------------------------------------------------------------------------------
    def _execute(self, idx: int, action: Action) -> None:
        handler = self.handlers.get(action.kind)
        t0, c0 = time.time(), time.thread_time()
        try:
            if handler is None:
                raise NotImplementedError(
                    f"the runtime has no handler for {action.kind.value} actions (known: "
                    f"{sorted(k.value for k in self.handlers)}); use a schedule without them"
                )
            with record_function(str(action)):
                handler(action)
        except Exception as exc:
            raise self._error(idx, action, exc) from exc
        t1 = time.time()
        self.trace.append(TraceEvent(self.rank, str(action), t0, t1, time.thread_time() - c0))
        if action.kind in COMPUTE:
            self.busy_s += t1 - t0
        self.executed += 1
        assert self.store is not None
        self.tracker.sample(*self.store.nbytes(), self.offload.buffer_bytes() if self.offload else 0)

    def _error(self, idx: int, action: Action | None, exc: BaseException) -> PipelineError:
        what = f"action {idx} ({action})" if action is not None else "the end-of-step check"
        mark = (self.rank, idx) if action is not None else None
        grid = to_grid(self.schedule, mark=mark, window=8) if mark else to_grid(self.schedule, window=8)
        s = self.schedule
        msg = (f"rank {self.rank} step {self.step}: {what} failed: {type(exc).__name__}: {exc}\n"
               f"schedule {s.name} (p={s.num_ranks}, v={s.virtual_stages}, m={s.num_microbatches}, "
               f"n={s.num_slices}):\n{grid}")
        log.debug(msg)  # the PipelineError carries it; its catcher reports it once (a dead peer: quietly)
        return PipelineError(msg)

    def _excluded(self, ptr: int) -> bool:
        assert self.store is not None
        return (ptr in self._param_ptrs or ptr in self._token_ptrs or ptr in self.store.buffer_ptrs
                or ptr in self.masks.ptrs)

    def _peer(self, a: Action) -> int:
        nxt = a.stage + 1 if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1
        return self.schedule.rank_of(nxt)

    def _shape(self, a: Action) -> tuple[int, int, int]:
        tokens = self.bounds[a.seq_slice + 1] - self.bounds[a.seq_slice]
        return (1, tokens // self.seq_shards, self.hidden)  # (b, t/T, h): this TP rank's tokens

    # ---- handlers -------------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        unit, info = a.unit, self.stages[a.stage]
        j, mb = a.seq_slice, a.microbatch
        start, end = self.bounds[j], self.bounds[j + 1]
        if info.first:
            inp, leaf = self.ids[mb : mb + 1, start:end], None  # (1, t) ids
        else:
            if unit not in self._inputs:
                raise RuntimeError(f"no input for {a}: its RECV_F (or upstream F) has not run")
            inp = leaf = self._inputs.pop(unit)  # (1, t, h), requires grad
        labels = self.labels[mb : mb + 1, start:end] if info.last else None
        assert self.store is not None
        slice_kv = self.store.begin_forward(a.stage, mb, j)
        if self.training:
            self.routing.attach(slice_kv.shared, mb, start)
        if self.exchange is not None:
            slice_kv.attention_hook = self.exchange.on_forward(a, slice_kv)
        offload = self.offload if self.training else None  # a forward-only step saves nothing
        if offload is not None:  # the next backward's activations start coming back
            offload.before_forward(unit)
        with self.tracker.saving(unit, offload):
            out = stage_forward(self.model, info, inp, slice_kv, labels, self.normaliser)
        if not self.training:
            self.store.end_forward(a.stage, mb, j)
        else:
            if self.offload is not None:  # the input stays held for its .grad: moving it would free nothing
                self.offload.after_forward(unit, keep=set() if leaf is None else {leaf.untyped_storage().data_ptr()})
            self._held[unit] = (leaf, out)
        if info.last:
            self.loss_sum += out.detach().double()
            return
        nxt = out.detach()
        # Same-rank handoff (p = 1) needs no message; with vocab parallelism the last stage's output
        # waits for VH (take_head_input).
        if a.stage == self.last_stage:
            self._head_in[(mb, j)] = nxt.requires_grad_()
        elif self.schedule.rank_of(a.stage + 1) == self.rank:
            self._inputs[(a.stage + 1, mb, j)] = nxt.requires_grad_()
        else:
            self._to_send_f[unit] = nxt

    def _backward(self, a: Action) -> None:
        unit, info = a.unit, self.stages[a.stage]
        if unit not in self._held:
            raise RuntimeError(f"{a} has no forward state: F{unit} did not run on this rank")
        assert self.store is not None
        self.store.begin_backward(a.stage, a.microbatch, a.seq_slice)
        if self.exchange is not None:
            self.exchange.on_backward(a)
        leaf, out = self._held.pop(unit)
        if not info.last and unit not in self._douts:
            raise RuntimeError(f"no output gradient for {a}: its RECV_B (or downstream B) has not run")
        if self.offload is not None:  # this unit's activations back; the next backward's prefetched
            self.offload.before_backward(unit)
        if info.last:
            torch.autograd.backward(out)  # the slice's loss, already scaled by 1/normaliser
        else:
            torch.autograd.backward(out, self._douts.pop(unit))
        if self.offload is not None:
            self.offload.after_backward(unit)
        self.store.end_backward(a.stage, a.microbatch, a.seq_slice)
        self.tracker.release(unit)
        if leaf is None:
            return
        grad = leaf.grad
        if grad is None:
            raise RuntimeError(f"{a}: the stage input received no gradient")
        if a.stage == 0:  # vocab parallelism: the embedding's gradient, for VB (take_embedding_grad)
            self._embed_grad[(a.microbatch, a.seq_slice)] = grad
        elif self.schedule.rank_of(a.stage - 1) == self.rank:
            self._douts[(a.stage - 1, a.microbatch, a.seq_slice)] = grad
        else:
            self._to_send_b[unit] = grad

    # ---- EndsPort (runtime/ports.py): what the vocabulary-parallel ends read and hand over -------------
    def put_embedding(self, mb: int, j: int, x: torch.Tensor) -> None:
        self._inputs[(0, mb, j)] = x

    def take_embedding_grad(self, mb: int, j: int) -> torch.Tensor:
        return self._embed_grad.pop((mb, j))

    def take_head_input(self, mb: int, j: int) -> torch.Tensor:
        return self._head_in.pop((mb, j))

    def put_head_grad(self, mb: int, j: int, grad: torch.Tensor) -> None:
        self._douts[(self.last_stage, mb, j)] = grad

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss

    def add_busy(self, seconds: float) -> None:
        self.busy_s += seconds

    def _send_f(self, a: Action) -> None:
        self.transport.send("fwd", _pop(self._to_send_f, a, "F").contiguous(), self._peer(a))

    def _send_b(self, a: Action) -> None:
        self.transport.send("bwd", _pop(self._to_send_b, a, "B").contiguous(), self._peer(a))

    def _recv_f(self, a: Action) -> None:
        buf = self.transport.recv("fwd", self._shape(a), self.dtype, self._peer(a))
        self._inputs[a.unit] = buf.requires_grad_()
        self._post(self._next_recv.get(a))

    def _recv_b(self, a: Action) -> None:
        self._douts[a.unit] = self.transport.recv("bwd", self._shape(a), self.dtype, self._peer(a))
        self._post(self._next_recv.get(a))

    def _post(self, a: Action | None) -> None:
        """Start receive ``a`` early: one receive ahead per channel."""
        if a is not None:
            self.transport.post(_channel(a), self._shape(a), self.dtype, self._peer(a))


def _receive_chains(program: tuple[Action, ...]) -> tuple[list[Action], dict[Action, Action]]:
    """Each channel's first RECV in program order, and every RECV's successor on its channel."""
    last: dict[str, Action] = {}
    firsts, nxt = [], {}
    for a in program:
        if a.kind in (Kind.RECV_F, Kind.RECV_B):
            ch = _channel(a)
            if ch in last:
                nxt[last[ch]] = a
            else:
                firsts.append(a)
            last[ch] = a
    return firsts, nxt


def _channel(a: Action) -> str:
    return "fwd" if a.kind in (Kind.SEND_F, Kind.RECV_F) else "bwd"


def _pop(d: dict[Unit, torch.Tensor], a: Action, src: str) -> torch.Tensor:
    if a.unit not in d:
        raise RuntimeError(f"{a}: nothing to send, {src}{a.unit} has not produced it on this rank")
    return d.pop(a.unit)
