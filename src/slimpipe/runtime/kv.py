"""The K/V store of one rank: per (stage, micro-batch) K/V buffers, prefix leaves and dK/dV hand-down.

Life of one (stage, micro-batch) entry (SlimPipe reference §5):

* forward of slice j (in order 0, 1, …, n−1): every layer writes its K/V into its buffer (allocated at
  slice 0 for the whole sequence) and attends to the window [0, end_j); the rows of earlier slices enter
  slice j's graph through a detached prefix leaf with requires_grad;
* backward of slice j (in order n−1, …, 0, and only after all n forwards): the window node adds the dK/dV
  that later slices handed down for rows [start_j, end_j); afterwards the prefix leaves' grads (rows
  [0, start_j)) are added into the entry's dK/dV accumulator for the earlier slices;
* after slice 0's backward the entry (buffers and accumulators) is dropped.

Any other order raises :class:`KVOrderError` before a gradient can go wrong, and so does state left over at
the end of a step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slimpipe.runtime.attention import KVWindow, MaskCache, window_attention
from slimpipe.runtime.context_parallel import ContextParallel
from slimpipe.runtime.documents import StepDocs, document_window_attention
from slimpipe.runtime.ports import AttentionHook
from slimpipe.runtime.recompute import replayed

__all__ = ["KVStore", "KVOrderError", "SliceKV"]


class KVOrderError(RuntimeError):
    """A slice forward/backward ran in an order that would make the K/V carry or its gradient wrong."""


@dataclass(slots=True)
class _LayerKV:
    k: torch.Tensor | None = None  # (b, s, H_kv, d): the sequence's keys, filled slice by slice
    v: torch.Tensor | None = None
    acc_k: torch.Tensor | None = None  # (b, start_{n-1}, H_kv, d): dK handed down to earlier slices
    acc_v: torch.Tensor | None = None
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # slice -> leaves


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
        self.training = training  # False: forward-only (evaluate); an entry ends after its last forward
        self.cp = cp
        self.n = len(bounds) - 1
        self.masks = masks
        self.recompute = recompute  # activation recompute mode (runtime/recompute.py)
        self.writes = 0  # slice-layer K/V writes this step: one per (F unit, layer), never by a replay
        self._entries: dict[tuple[int, int], _Entry] = {}
        self.buffer_ptrs: set[int] = set()  # storages of live K/V buffers (memory accounting)
        self.kv_bytes = 0  # bytes of live K/V buffers
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
                self.buffer_ptrs.difference_update(_ptr(t) for t in (lk.k, lk.v))
                self.kv_bytes -= _storage_bytes(lk.k) + _storage_bytes(lk.v)
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
        entry = self._entries[(stage, mb)]
        for lk in entry.layers.values():
            leaves = lk.prefix.pop(j, None)
            if leaves is not None:
                before = _storage_bytes(lk.acc_k) + _storage_bytes(lk.acc_v)
                lk.acc_k = _accumulate(lk.acc_k, leaves[0])
                lk.acc_v = _accumulate(lk.acc_v, leaves[1])
                self.dkv_bytes += _storage_bytes(lk.acc_k) + _storage_bytes(lk.acc_v) - before
        entry.next_bwd -= 1
        if j == 0:  # nothing of this micro-batch's K/V is needed any more
            for lk in entry.layers.values():
                self.buffer_ptrs.difference_update(_ptr(t) for t in (lk.k, lk.v))
                self.kv_bytes -= _storage_bytes(lk.k) + _storage_bytes(lk.v)
                self.dkv_bytes -= _storage_bytes(lk.acc_k) + _storage_bytes(lk.acc_v)
            del self._entries[(stage, mb)]

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
        """(K/V buffer bytes, dK/dV accumulator bytes) currently held."""
        return self.kv_bytes, self.dkv_bytes



def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


def _accumulate(acc: torch.Tensor | None, leaf: torch.Tensor) -> torch.Tensor | None:
    grad = leaf.grad
    if grad is None:  # the prefix did not influence the output (cannot happen for causal attention)
        return acc
    if acc is None:  # the first backward (slice n−1) covers every earlier row: it becomes the accumulator
        if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            grad = grad.clone()  # a view into the whole window's dK: keep only the prefix rows
        return grad
    acc[:, : grad.size(1)] += grad
    return acc


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
        if row is not None and docs.restart_positions:
            self.positions = row.positions(self.start, self.end, docs.labels.device)
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
        if self.replaying:
            return self._replay_attend(layer_id, q)
        self.store.writes += 1
        lk = self.entry.layers.setdefault(layer_id, _LayerKV())
        if lk.k is None:
            seq = self.store.bounds[-1]  # s, or s/c rows under context parallelism
            lk.k = k.new_empty((k.size(0), seq, *k.shape[2:]))  # (b, s, H_kv, d)
            lk.v = v.new_empty((v.size(0), seq, *v.shape[2:]))
            self.store.buffer_ptrs.update((_ptr(lk.k), _ptr(lk.v)))
            self.store.kv_bytes += _storage_bytes(lk.k) + _storage_bytes(lk.v)
        assert lk.v is not None
        start = self.start
        kp = vp = None
        if start and self.store.training:
            kp = lk.k[:, :start].detach().requires_grad_()  # (b, start, H_kv, d): the prefix leaves
            vp = lk.v[:, :start].detach().requires_grad_()
            lk.prefix[self.j] = (kp, vp)
        k_win = KVWindow.apply(k, kp, lk.k, start, functools.partial(_handed, lk, "acc_k", start, self.end))
        v_win = KVWindow.apply(v, vp, lk.v, start, functools.partial(_handed, lk, "acc_v", start, self.end))
        return self._attend_window(layer_id, q, k_win, v_win)

    def _attend_window(self, layer_id: int, q: torch.Tensor, k_win: torch.Tensor,
                       v_win: torch.Tensor) -> torch.Tensor:
        if self.attention_hook is not None:
            return self.attention_hook.attend(layer_id, q, k_win, v_win)
        return self.local_attention(q, k_win, v_win)

    def local_attention(self, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor) -> torch.Tensor:
        """This slice's attention over the window computed without the exchange: the rank's own window
        attention, the CP group's query-out attention, or packed documents' document-causal attention."""
        if self.store.cp is not None:
            return self.store.cp.attend(self.start, q, k_win, v_win)
        if self.spans is not None:
            return document_window_attention(q, k_win, v_win, self.spans)
        return window_attention(q, k_win, v_win, self.start, self.store.masks, self.store.bounds[-1])


    def _replay_attend(self, layer_id: int, q: torch.Tensor) -> torch.Tensor:
        """A replayed forward: the window as the forward wrote it, read from the store, nothing written;
        the recomputed k, v equal the stored rows and are not needed."""
        lk = self.entry.layers.get(layer_id)
        if lk is None or lk.k is None or lk.v is None:
            raise KVOrderError(f"replay of slice {self.j} layer {layer_id}: its K/V are not in the store")
        k_win, v_win = lk.k[:, : self.end], lk.v[:, : self.end]  # views: (b, end, H_kv, d)
        return self._attend_window(layer_id, q, k_win, v_win)


def _handed(lk: _LayerKV, which: str, start: int, end: int) -> torch.Tensor | None:
    acc = getattr(lk, which)
    return None if acc is None else acc[:, start:end]


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
