"""Per-rank memory accounting of one step: saved activations, K/V buffers, dK/dV accumulators.

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

import torch

__all__ = ["MemoryTracker", "MemoryPeaks"]

Unit = tuple[int, int, int]  # (stage, micro-batch, slice)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryPeaks:
    """Peaks of one rank over one step, in bytes."""

    saved: int
    """Peak saved-for-backward bytes (K/V buffers, parameters and constants excluded)."""
    kv: int
    """Peak K/V buffer + dK/dV accumulator bytes."""
    total: int
    """Peak of saved + K/V + dK/dV (sampled together, so ≤ saved + kv)."""


class MemoryTracker:
    """Counts the storages each unit saves for backward; ``excluded(ptr)`` filters out non-activations."""

    def __init__(self, excluded: Callable[[int], bool]) -> None:
        self._excluded = excluded
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, number of live units saving it]
        self._units: dict[Unit, set[int]] = {}
        self.current = 0
        self.reset()

    def reset(self) -> None:
        self._live.clear()
        self._units.clear()
        self.current = 0
        self.peak_saved = self.peak_kv = self.peak_total = 0

    @contextmanager
    def saving(self, unit: Unit) -> Iterator[None]:
        """Attribute every tensor saved inside the block to ``unit``."""
        ptrs = self._units.setdefault(unit, set())

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in ptrs and not self._excluded(ptr):
                ptrs.add(ptr)
                entry = self._live.get(ptr)
                if entry is None:
                    self._live[ptr] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                else:
                    entry[1] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            yield

    def release(self, unit: Unit) -> None:
        """The unit's backward ran: its saved tensors are gone (unless another live unit saved them too)."""
        for ptr in self._units.pop(unit, ()):
            entry = self._live[ptr]
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[ptr]

    def sample(self, kv_bytes: int, dkv_bytes: int) -> None:
        kv = kv_bytes + dkv_bytes
        self.peak_saved = max(self.peak_saved, self.current)
        self.peak_kv = max(self.peak_kv, kv)
        self.peak_total = max(self.peak_total, self.current + kv)

    def live_units(self) -> int:
        return len(self._units)

    def peaks(self) -> MemoryPeaks:
        return MemoryPeaks(saved=self.peak_saved, kv=self.peak_kv, total=self.peak_total)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
