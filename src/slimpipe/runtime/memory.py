"""Per-rank memory accounting of one step: saved activations, K/V blocks, dK/dV accumulators.

Saved activations are the tensors autograd saves for backward during a unit's forward, captured with
``saved_tensors_hooks``: each distinct storage (``untyped_storage().data_ptr()``) counts once with its full
``nbytes()``, as long as at least one unit that saved it has not run its backward. Excluded: parameters,
constants (the causal-mask table), the step's token tensor (ids and labels are input data) and the K/V
buffers of the store, which are counted separately as K/V together with the dK/dV accumulators. Peaks are
sampled after every action, so they are deterministic and comparable with the memory model; transient
buffers inside one backward are not seen (on CUDA, ``max_memory_allocated`` sees everything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["MemoryTracker", "MemoryPeaks", "Boxer"]

Unit = tuple[int, int, int]  # (stage, micro-batch, slice)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryPeaks:
    """Peaks of one rank over one step, in bytes."""

    saved: int
    """Peak saved-for-backward bytes (K/V blocks, parameters and constants excluded)."""
    kv: int
    """Peak K/V block + dK/dV accumulator bytes."""
    total: int
    """Peak of saved + K/V + dK/dV + offload restore buffers (sampled together, so ≤ the sum of peaks)."""
    offloaded: int = 0
    """Peak bytes of saved activations held in host memory (activation offload)."""


class MemoryTracker:
    """Counts the storages each unit saves for backward; ``excluded(ptr)`` filters out non-activations."""

    def __init__(self, excluded: Callable[[int], bool]) -> None:
        self._excluded = excluded
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, number of live units saving it]
        self._units: dict[Unit, set[int]] = {}
        self._off_units: dict[Unit, int] = {}  # unit -> bytes it has in host memory
        self.current = 0
        self.reset()

    def reset(self) -> None:
        self._live.clear()
        self._units.clear()
        self._off_units.clear()
        self.current = self.offloaded = 0
        self.peak_saved = self.peak_kv = self.peak_total = self.peak_offloaded = 0
        # Resident saved + K/V (+ restore buffers) without dK/dV: what the memory model's activations
        # (+ kv_cache) predict; and dK/dV alone (its kv_grad term).
        self.peak_act = self.peak_dkv = 0

    @contextmanager
    def saving(self, unit: Unit, boxer: Boxer | None = None) -> Iterator[None]:
        """Attribute every tensor saved inside the block to ``unit``; with a ``boxer`` (activation
        offload) autograd keeps the boxer's handles instead of the activations themselves."""
        ptrs = self._units.setdefault(unit, set())

        def pack(t: torch.Tensor) -> object:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or self._excluded(ptr):
                return t
            if ptr not in ptrs:
                ptrs.add(ptr)
                entry = self._live.get(ptr)
                if entry is None:
                    self._live[ptr] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                else:
                    entry[1] += 1
            return t if boxer is None else boxer.box(unit, t, ptr)

        unpack = _identity if boxer is None else boxer.unbox
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def moved_out(self, unit: Unit, ptr: int, nbytes: int) -> None:
        """A storage only ``unit`` saved left the device (offload); it is back, as restore buffers, in B."""
        self._units[unit].discard(ptr)
        entry = self._live.pop(ptr)
        assert entry[1] == 1, "offloaded a storage another live unit saves"
        self.current -= entry[0]
        self.offloaded += nbytes
        self._off_units[unit] = self._off_units.get(unit, 0) + nbytes

    def release(self, unit: Unit) -> None:
        """The unit's backward ran: its saved tensors are gone (unless another live unit saved them too)."""
        for ptr in self._units.pop(unit, ()):
            entry = self._live[ptr]
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[ptr]
        self.offloaded -= self._off_units.pop(unit, 0)

    def sample(self, kv_bytes: int, dkv_bytes: int, buffers: int = 0) -> None:
        """``buffers``: device bytes of the offload restore buffers (resident, like the activations)."""
        kv = kv_bytes + dkv_bytes
        self.peak_saved = max(self.peak_saved, self.current)
        self.peak_kv = max(self.peak_kv, kv)
        self.peak_total = max(self.peak_total, self.current + kv + buffers)
        self.peak_offloaded = max(self.peak_offloaded, self.offloaded)
        self.peak_act = max(self.peak_act, self.current + kv_bytes + buffers)
        self.peak_dkv = max(self.peak_dkv, dkv_bytes)

    def live_units(self) -> int:
        return len(self._units)

    def peaks(self) -> MemoryPeaks:
        return MemoryPeaks(saved=self.peak_saved, kv=self.peak_kv, total=self.peak_total,
                           offloaded=self.peak_offloaded)


class Boxer(Protocol):
    """What replaces saved tensors in autograd's graph (runtime/offload.Offloader)."""

    def box(self, unit: Unit, t: torch.Tensor, ptr: int) -> object: ...

    def unbox(self, handle: object) -> torch.Tensor: ...


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
