"""The K/V store of one rank: per (stage, micro-batch, layer) one K/V block per slice, and dK/dV hand-down.

Life of one (stage, micro-batch) entry (SlimPipe reference §5), per layer:

* forward of slice j (in order 0, 1, …, n−1): the slice's post-RoPE K/V become block j — the very tensors
  the layer computed (``detach()``: no copy) unless they are views into something larger — and its queries
  attend to blocks 0 … j−1 in place plus their own block (slice_attention.SliceAttention);
* backward of slice j (in order n−1, …, 0, only after all n forwards): the attention node hands its dK/dV
  for each earlier block i down into block i's accumulator (``deposit``) and adds what later slices
  handed to block j (``handed``) to its own K/V gradient; then block j and its accumulator are freed:
  no later backward reads them.

So K/V follow the in-flight slices (a partially forwarded micro-batch holds only its forwarded blocks) and
dK/dV exist only for blocks still awaiting their backward. A recompute replay (``SliceKV.replaying``) reads
blocks 0 … j from the store and writes nothing (``KVStore.writes`` counts the writes). Any other order
raises :class:`KVOrderError` before a gradient can go wrong, and so does state left over at the end of a
step. ``MaskCache`` modes ``table``/``bias`` (legacy single-call kernels, for comparison) concatenate the
window for each call (a copy per slice and layer, saved for backward).

The slice's attention over its blocks (``SliceKV.local_attention``): slice_attention.SliceAttention; under
context parallelism the CP group's query-out attention over this rank's blocks (its zig-zag pieces of every
slice: runtime/cp_attention.py); with packed documents the document-causal segments, which read only the
blocks the carry-in document reaches (runtime/documents.py: blocks before it get no dK/dV accumulator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slimpipe.runtime.attention import MaskCache, window_attention
from slimpipe.runtime.context_parallel import ContextParallel
from slimpipe.runtime.documents import StepDocs, document_attention
from slimpipe.runtime.ports import AttentionHook
from slimpipe.runtime.recompute import replayed
from slimpipe.runtime.slice_attention import Window, slice_attention

__all__ = ["KVStore", "KVOrderError", "SliceKV"]


class KVOrderError(RuntimeError):
    """A slice forward/backward ran in an order that would make the K/V carry or its gradient wrong."""


@dataclass(slots=True)
class _LayerKV:
    k: list[torch.Tensor | None] = field(default_factory=list)  # block j: (b, t_j, H_kv, d), None once freed
    v: list[torch.Tensor | None] = field(default_factory=list)
    acc: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # block i -> [dK, dV] handed down


@dataclass(slots=True)
class _Entry:
    next_fwd: int = 0
    next_bwd: int = -1  # set to n−1 once every slice was forwarded
    layers: dict[int, _LayerKV] = field(default_factory=dict)


class KVStore:
    """K/V carry across slices for every (stage, micro-batch) of one rank."""

    def __init__(self, bounds: list[int], masks: MaskCache, recompute: str = "none", *,
                 training: bool = True, cp: ContextParallel | None = None,
                 docs: StepDocs | None = None) -> None:
        # Token boundaries of the n slices in this rank's rows: slice j = [bounds[j], bounds[j+1]). With
        # context parallelism they are local rows (the rank's 2P tokens of every slice), and the slice's
        # attention is the CP group's query-out attention.
        self.bounds = bounds
        self.docs = docs  # packed documents: document-causal attention, per-document positions
        self.cp = cp
        self.training = training  # False: forward-only (evaluate); an entry ends after its last forward
        self.n = len(bounds) - 1
        self.masks = masks
        self.recompute = recompute  # activation recompute mode (runtime/recompute.py)
        self.writes = 0  # slice-layer K/V writes this step: one per (F unit, layer), never by a replay
        self._entries: dict[tuple[int, int], _Entry] = {}
        self.buffer_ptrs: set[int] = set()  # storages of live K/V blocks (memory accounting)
        self.kv_bytes = 0  # bytes of live K/V blocks
        self.dkv_bytes = 0  # bytes of live dK/dV accumulators

    def begin_forward(self, stage: int, mb: int, j: int) -> SliceKV:
        entry = self._entries.setdefault((stage, mb), _Entry())
        if j != entry.next_fwd:
            raise KVOrderError(
                f"forward of slice {j} of stage {stage} micro-batch {mb} out of order: slices must be "
                f"forwarded 0, 1, …, {self.n - 1} (expected slice {entry.next_fwd})"
            )
        entry.next_fwd += 1
        if entry.next_fwd == self.n:
            entry.next_bwd = self.n - 1
        return SliceKV(self, entry, j, mb)

    def end_forward(self, stage: int, mb: int, j: int) -> None:
        """Forward-only steps: drop the entry once its last slice was forwarded (no backward follows)."""
        if self.training:
            raise KVOrderError("end_forward is for forward-only steps; a training step ends entries in backward")
        if j == self.n - 1:
            for lk in self._entries[(stage, mb)].layers.values():
                for i in range(len(lk.k)):
                    self._drop(lk.k, i)
                    self._drop(lk.v, i)
            del self._entries[(stage, mb)]

    def begin_backward(self, stage: int, mb: int, j: int) -> None:
        entry = self._entries.get((stage, mb))
        if entry is None or entry.next_fwd < self.n:
            done = 0 if entry is None else entry.next_fwd
            raise KVOrderError(
                f"backward of slice {j} of stage {stage} micro-batch {mb} before all {self.n} slices were "
                f"forwarded ({done} were): a slice's backward needs the dK/dV of every later slice"
            )
        if j != entry.next_bwd:
            raise KVOrderError(
                f"backward of slice {j} of stage {stage} micro-batch {mb} out of reverse order: slices must "
                f"run backward {self.n - 1}, …, 0 (expected slice {entry.next_bwd}); a FIFO slice backward "
                "would miss the dK/dV later slices hand down"
            )

    def end_backward(self, stage: int, mb: int, j: int) -> None:
        """Slice j's backward ran: its K/V blocks are read by no later backward, free them."""
        entry = self._entries[(stage, mb)]
        for layer, lk in entry.layers.items():
            if j in lk.acc:
                raise KVOrderError(f"dK/dV handed down to slice {j} of stage {stage} micro-batch {mb} layer "
                                   f"{layer} was never consumed: its attention did not run backward")
            self._drop(lk.k, j)
            self._drop(lk.v, j)
        entry.next_bwd -= 1
        if j == 0:
            del self._entries[(stage, mb)]

    def _drop(self, blocks: list[torch.Tensor | None], j: int) -> None:
        t = blocks[j]
        if t is not None:
            self.buffer_ptrs.discard(_ptr(t))
            self.kv_bytes -= _storage_bytes(t)
            blocks[j] = None

    def _append(self, blocks: list[torch.Tensor | None], t: torch.Tensor) -> torch.Tensor:
        """Keep the slice's own K or V (b, t, H_kv, d) as its block; a view into a larger storage (a fused
        QKV projection) is copied, so the block holds its own bytes only."""
        t = t.detach()
        if not t.is_contiguous() or _storage_bytes(t) != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        blocks.append(t)
        self.buffer_ptrs.add(_ptr(t))
        self.kv_bytes += _storage_bytes(t)
        return t

    def deposit(self, lk: _LayerKV, i: int, dk: torch.Tensor, dv: torch.Tensor, row: int = 0) -> None:
        """Add one later slice's dK/dV for rows [row, row + len) of block i (b, len, H_kv, d) into block i's
        accumulator (created on the first deposit: a block nobody reads never gets one)."""
        acc = lk.acc.get(i)
        block = lk.k[i]
        assert block is not None, f"dK/dV for freed block {i}"
        whole = row == 0 and dk.size(1) == block.size(1)
        if acc is None and whole:
            held = [g if _storage_bytes(g) == g.numel() * g.element_size() else g.clone() for g in (dk, dv)]
            lk.acc[i] = held
            self.dkv_bytes += sum(_storage_bytes(g) for g in held)
            return
        if acc is None:  # part of the block (packed documents: the carry-in document starts inside it)
            acc = lk.acc[i] = [dk.new_zeros(block.shape), dv.new_zeros(block.shape)]
            self.dkv_bytes += sum(_storage_bytes(g) for g in acc)
        rows = slice(row, row + dk.size(1))
        acc[0][:, rows] += dk
        acc[1][:, rows] += dv

    def handed(self, lk: _LayerKV, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What later slices handed down to block j (consumed: the accumulator is freed after use)."""
        acc = lk.acc.pop(j, None)
        if acc is None:
            return None, None
        self.dkv_bytes -= sum(_storage_bytes(g) for g in acc)
        return acc[0], acc[1]

    def check_drained(self) -> None:
        if self._entries:
            left = ", ".join(
                f"stage {st} micro-batch {mb} ({e.next_fwd} of {self.n} slices forwarded, "
                f"{self.n - 1 - e.next_bwd if e.next_bwd >= 0 else 0} backwarded)"
                for (st, mb), e in sorted(self._entries.items())
            )
            raise KVOrderError(f"K/V state left over at the end of the step: {left}")

    def reset(self) -> None:
        """Drop everything (after a failed step)."""
        self._entries.clear()
        self.buffer_ptrs.clear()
        self.kv_bytes = self.dkv_bytes = 0

    def nbytes(self) -> tuple[int, int]:
        """(K/V block bytes, dK/dV accumulator bytes) currently held."""
        return self.kv_bytes, self.dkv_bytes


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class SliceKV:
    """The K/V view of one (stage, micro-batch, slice) forward; hands a LayerContext to each layer."""

    def __init__(self, store: KVStore, entry: _Entry, j: int, mb: int = 0) -> None:
        self.store, self.entry, self.j = store, entry, j
        self.start, self.end = store.bounds[j], store.bounds[j + 1]
        cp = store.cp
        # Global positions: the slice's first token, and the tokens this rank holds when not contiguous.
        self.first = self.start if cp is None else cp.global_start(j)
        self.positions = None if cp is None else cp.positions[self.start:self.end]  # type: ignore[index]
        self.shared: dict[str, object] = {}
        docs = store.docs
        row = None if docs is None else docs.rows[mb]
        self.spans = None if row is None else row.spans(self.start, self.end)  # packed documents
        if row is not None and docs.restart_positions:  # type: ignore[union-attr]
            self.positions = row.positions(self.start, self.end, docs.labels.device)  # type: ignore[union-attr]
        # Set by the executor when a feature takes over this unit's attention (the exchange: ports.py).
        self.attention_hook: AttentionHook | None = None
        self.replaying = False  # inside a recompute region's replay (during this unit's backward)

    def layer(self, layer_id: int) -> _LayerCtx:
        return _LayerCtx(self, layer_id)

    def checkpoint(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        """fn(*args) as a recompute region of this slice (LayerContext.checkpoint)."""
        return replayed(fn, args, self._replay)

    @contextmanager
    def _replay(self) -> Iterator[None]:
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (b, t, H, d), k/v (b, t, H_kv, d) of this slice -> (b, t, H, d)."""
        if k.size(1) != self.end - self.start:
            raise ValueError(f"slice {self.j} has {self.end - self.start} tokens, attention got {k.size(1)}")
        store = self.store
        if self.replaying:  # inside this unit's backward: read the blocks the forward stored, write nothing
            lk = self.entry.layers.get(layer_id)
            if lk is None or len(lk.k) <= self.j or lk.k[self.j] is None:
                raise KVOrderError(f"replay of slice {self.j} layer {layer_id}: its K/V are not in the store")
            k, v = lk.k[self.j], lk.v[self.j]  # type: ignore[assignment]
        else:
            lk = self.entry.layers.setdefault(layer_id, _LayerKV())
            if len(lk.k) != self.j:
                raise KVOrderError(f"slice {self.j} layer {layer_id}: the store holds {len(lk.k)} blocks")
            store.writes += 1
            store._append(lk.k, k)
            store._append(lk.v, v)
        window = Window(prefix_k=lk.k[: self.j], prefix_v=lk.v[: self.j],  # type: ignore[arg-type]
                        handed=lambda: store.handed(lk, self.j),
                        deposit=lambda i, dk, dv, row=0: store.deposit(lk, i, dk, dv, row))
        if self.attention_hook is not None:
            return self.attention_hook.attend(layer_id, q, k, v, window)
        return self.local_attention(q, k, v, window)

    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window) -> torch.Tensor:
        """This slice's attention over its block and the window (with the partners an exchange named on it):
        the rank's slice attention, the CP group's query-out attention, or packed documents' document-causal
        attention."""
        store = self.store
        if store.cp is not None:
            return store.cp.attend(q, k, v, window)
        if self.spans is not None:
            return document_attention(q, k, v, window, self.spans)
        if store.masks.mode in ("table", "bias"):  # legacy single-call kernels over a concatenated window
            k_win, v_win = _WindowCat.apply(k, v, window)
            return window_attention(q, k_win, v_win, self.start, store.masks, store.bounds[-1])
        return slice_attention(q, k, v, window, store.masks)


class _WindowCat(torch.autograd.Function):
    """Legacy modes: own k/v (b, t, H_kv, d) after the window's blocks -> contiguous k/v windows
    (b, end, H_kv, d); backward hands the prefix rows down block by block."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, window: Window):  # type: ignore[override]
        ctx.window = window
        return (torch.cat([*window.prefix_k, k.detach()], 1), torch.cat([*window.prefix_v, v.detach()], 1))

    @staticmethod
    def backward(ctx, dk_win: torch.Tensor, dv_win: torch.Tensor):  # type: ignore[override]
        window: Window = ctx.window
        lo = 0
        for i, blk in enumerate(window.prefix_k):
            hi = lo + blk.size(1)
            window.deposit(i, dk_win[:, lo:hi], dv_win[:, lo:hi])
            lo = hi
        return *window.with_handed(dk_win[:, lo:], dv_win[:, lo:]), None


class _LayerCtx:
    """LayerContext (slimpipe.models.base) of one layer within one slice."""

    __slots__ = ("_slice", "_layer", "start", "positions", "shared", "recompute")

    def __init__(self, slice_kv: SliceKV, layer_id: int) -> None:
        self._slice, self._layer = slice_kv, layer_id
        self.start, self.positions = slice_kv.first, slice_kv.positions
        self.shared = slice_kv.shared
        self.recompute = slice_kv.store.recompute

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._slice.attend(self._layer, q, k, v)

    def checkpoint(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        return self._slice.checkpoint(fn, *args)
