"""Pipeline-aware activation offload (SlimPipe reference §10): ≈ α of each unit's saved bytes go to host memory
after its forward and come back one backward ahead of use.

Mechanics, per unit (one F/B pair of the rank's program):

* **capture**: the forward runs under ``saved_tensors_hooks`` (memory.MemoryTracker.saving); every saved
  storage that is not a parameter, input data, the K/V store or the unit's input becomes a
  :class:`_Stored` and autograd keeps a :class:`_Handle` (dtype, shape, strides, offset) instead of the
  tensor, so the storage can leave the device and come back elsewhere;
* **select** (after F): storages of ≥ ``min_bytes`` that nothing else references, largest first, until
  their bytes are the closest to α of all the unit's saved bytes (whole storages; the official code may
  split one); a unit is offloaded only when at least ``min_gap`` compute actions run between its F and its
  B on this rank, otherwise the copies could not hide behind compute (units at the cool-down's edge and
  most of the last stage stay resident);
* **copy out**: on CUDA on a side stream into pinned host memory (``record_stream`` lets the allocator
  reuse the device block only after the copy), on CPU a synchronous copy into a separate host tensor;
* **prefetch**: when the compute action right before B(u) starts (an F in the steady state, the previous B
  in the cool-down), u's data is copied into one of two reusable device buffers (ping-pong), so it has
  that action's time to arrive; B(u) waits only for its own copy (an event on CUDA). A unit whose data
  was not prefetched is loaded on demand (exposed).

The CUDA path (streams, pinned memory, events) has not run on a GPU yet: on CPU the host is the device, so
the logic (selection, accounting, prefetch order, buffer reuse, bitwise-equal gradients) is what the tests
check, through the synchronous :class:`_HostMover`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from slimpipe.config import ConfigError
from slimpipe.schedule.actions import Action, Kind

__all__ = ["OffloadConfig", "Offloader", "offload_gaps", "as_offload"]

Unit = tuple[int, int, int]  # (stage, micro-batch, slice)
_ALIGN = 256  # byte alignment of tensors restored into a buffer (any dtype, vectorised kernels)


@dataclass(frozen=True, kw_only=True, slots=True)
class OffloadConfig:
    """Activation offload of one runtime."""

    ratio: float = 0.0
    """α: the fraction of each offloaded unit's saved bytes moved to host memory, in [0, 1)."""
    min_bytes: int = 1 << 20
    """Saved storages smaller than this stay on the device (the official threshold: 1 MiB)."""
    min_gap: int = 2
    """Offload a unit only when at least this many F/B actions run between its F and its B on the rank
    (one hides the copy out, one the prefetch)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"offload={self.ratio!r} must be in [0, 1): it is the offloaded fraction α")
        if self.min_bytes < 0 or self.min_gap < 0:
            raise ConfigError(f"offload min_bytes={self.min_bytes}, min_gap={self.min_gap} must be ≥ 0")


def as_offload(offload: float | OffloadConfig) -> OffloadConfig:
    """A runtime's ``offload=`` argument: α alone (other fields default) or a whole OffloadConfig."""
    return offload if isinstance(offload, OffloadConfig) else OffloadConfig(ratio=float(offload))


def offload_gaps(program: list[Action]) -> dict[Unit, int]:
    """Per forward unit of a rank's program: F/B actions strictly between its F and its B."""
    compute = [a for a in program if a.kind in (Kind.F, Kind.B)]
    where = {(a.kind, a.unit): i for i, a in enumerate(compute)}
    return {a.unit: where[(Kind.B, a.unit)] - i - 1 for i, a in enumerate(compute)
            if a.kind is Kind.F and (Kind.B, a.unit) in where}


class _Stored:
    """One saved storage of a unit: on the device, on the host, or restored into a buffer."""

    __slots__ = ("ptr", "nbytes", "storage", "host", "base")

    def __init__(self, ptr: int, storage: torch.UntypedStorage) -> None:
        self.ptr, self.nbytes = ptr, storage.nbytes()
        self.storage: torch.UntypedStorage | None = storage  # the device storage, or a restore buffer's
        self.host: torch.Tensor | None = None  # (nbytes,) uint8 host copy while offloaded
        self.base = 0  # byte offset of the data in ``storage``


class _Handle:
    """What autograd keeps instead of a saved tensor: the storage and how to view it."""

    __slots__ = ("stored", "dtype", "size", "stride", "offset")

    def __init__(self, stored: _Stored, t: torch.Tensor) -> None:
        self.stored, self.dtype = stored, t.dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        st = self.stored
        if st.storage is None:
            raise RuntimeError("an offloaded activation was used before its unit's backward restored it")
        out = torch.empty(0, dtype=self.dtype, device=st.storage.device)
        return out.set_(st.storage, st.base // self.dtype.itemsize + self.offset, self.size, self.stride)


@dataclass(slots=True)
class _UnitState:
    stored: dict[int, _Stored] = field(default_factory=dict)  # ptr -> storage saved by the unit
    offloaded: list[_Stored] = field(default_factory=list)
    slot: int = -1  # restore buffer while restored
    ready: object = None  # CUDA event: the restore copy is complete
    saved_bytes: int = 0


class _HostMover:
    """CPU: copies are synchronous; the 'host' copy is another CPU tensor, the buffers CPU tensors."""

    def copy_out(self, srcs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [s.clone() for s in srcs]

    def copy_in(self, buf: torch.Tensor, parts: list[tuple[int, torch.Tensor]], free: object) -> object:
        for off, host in parts:
            buf[off : off + host.numel()].copy_(host)
        return None

    def wait(self, ready: object) -> None:
        pass

    def released(self) -> object:
        return None

    def seconds(self) -> tuple[float, float]:
        return 0.0, 0.0


class _CudaMover:
    """CUDA: copies on a side stream into pinned host memory and back; events order both streams.

    Not run on a GPU yet (no device in the development sessions); the copies, events and record_stream
    calls are the standard pattern of torch's own offload helpers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        self._copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _timed(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def copy_out(self, srcs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # the forward produced them
        t0, t1 = self._timed()
        hosts = []
        with torch.cuda.stream(self.side):
            t0.record()
            for s in srcs:
                host = torch.empty(s.numel(), dtype=torch.uint8, pin_memory=True)
                host.copy_(s, non_blocking=True)
                s.record_stream(self.side)  # the allocator reuses the block only after this copy
                hosts.append(host)
            t1.record()
        self._copies.append((t0, t1))
        return hosts

    def copy_in(self, buf: torch.Tensor, parts: list[tuple[int, torch.Tensor]], free: object) -> object:
        if free is not None:
            self.side.wait_event(free)  # type: ignore[arg-type]  # the buffer's previous unit finished B
        t0, t1 = self._timed()
        with torch.cuda.stream(self.side):
            t0.record()
            for off, host in parts:
                buf[off : off + host.numel()].copy_(host, non_blocking=True)
            t1.record()
        buf.record_stream(self.side)
        self._copies.append((t0, t1))
        return t1

    def wait(self, ready: object) -> None:
        if ready is None:
            return
        cur = torch.cuda.current_stream(self.device)
        t0, t1 = self._timed()
        t0.record(cur)
        cur.wait_event(ready)  # type: ignore[arg-type]
        t1.record(cur)
        self._waits.append((t0, t1))

    def released(self) -> object:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def seconds(self) -> tuple[float, float]:
        """(copy time on the side stream, compute-stream time spent waiting for copies) since the last call."""
        torch.cuda.synchronize(self.device)
        copy = sum(a.elapsed_time(b) for a, b in self._copies) / 1e3
        exposed = sum(a.elapsed_time(b) for a, b in self._waits) / 1e3
        self._copies.clear()
        self._waits.clear()
        return copy, exposed


def _use_count(storage: torch.UntypedStorage) -> int:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return 1 if count is None else int(count(storage._cdata))


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Offloader:
    """One rank's offload: boxes saved tensors (``box``/``unbox``), selects and copies after each F,
    restores before each B and prefetches the next backward unit.

    ``moved(unit, ptr, nbytes)`` tells the memory tracker a storage left the device."""

    def __init__(self, config: OffloadConfig, program: list[Action], device: torch.device,
                 moved: object) -> None:
        self.config, self.device = config, device
        self.gaps = offload_gaps(program)
        self.backward_order = [a.unit for a in program if a.kind is Kind.B]
        # compute action -> the unit of the B right after it: its activations come back during this action
        compute = [a for a in program if a.kind in (Kind.F, Kind.B)]
        self._next_b: dict[tuple[Kind, Unit], Unit] = {
            (a.kind, a.unit): b.unit for a, b in zip(compute, compute[1:]) if b.kind is Kind.B}
        self._moved = moved
        self.mover = _CudaMover(device) if device.type == "cuda" else _HostMover()
        self.buffers: list[torch.Tensor | None] = [None, None]  # reusable restore buffers (ping-pong)
        self._free_events: list[object] = [None, None]
        self._units: dict[Unit, _UnitState] = {}
        self.begin_step()

    # ---- per step ------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._units.clear()
        self.per_unit: dict[Unit, tuple[int, int]] = {}  # unit -> (saved bytes, offloaded bytes)
        self.restores: list[tuple[Unit, bool]] = []  # (unit, restored ahead of its backward)
        self.host_copy_s = 0.0  # CPU: time of synchronous copies

    def end_step(self) -> None:
        if self._units:
            raise RuntimeError(f"offload state left over at the end of the step: {sorted(self._units)}")

    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers if b is not None)

    def copy_seconds(self) -> tuple[float, float]:
        """(copy seconds, exposed seconds) of the step: CUDA events, or the synchronous CPU copies."""
        if isinstance(self.mover, _CudaMover):
            return self.mover.seconds()
        return self.host_copy_s, self.host_copy_s

    # ---- saved-tensor hooks --------------------------------------------------------------------------
    def box(self, unit: Unit, t: torch.Tensor, ptr: int) -> _Handle:
        state = self._units.setdefault(unit, _UnitState())
        stored = state.stored.get(ptr)
        if stored is None:
            stored = state.stored[ptr] = _Stored(ptr, t.untyped_storage())
        return _Handle(stored, t)

    @staticmethod
    def unbox(h: object) -> torch.Tensor:
        return h.tensor() if isinstance(h, _Handle) else h  # type: ignore[return-value]

    # ---- F: select and copy out ----------------------------------------------------------------------
    def after_forward(self, unit: Unit, keep: set[int]) -> None:
        """``keep``: storages the executor itself holds (the unit's input): moving them frees nothing."""
        state = self._units.get(unit)
        if state is None:
            return
        state.saved_bytes = sum(s.nbytes for s in state.stored.values())
        chosen = self._select(unit, state, keep) if self.gaps.get(unit, 0) >= self.config.min_gap else []
        if chosen:
            t0 = time.perf_counter()
            hosts = self.mover.copy_out([_bytes_view(s.storage) for s in chosen])  # type: ignore[arg-type]
            self.host_copy_s += time.perf_counter() - t0
            for s, host in zip(chosen, hosts):
                s.host, s.storage = host, None
                self._moved(unit, s.ptr, s.nbytes)  # type: ignore[operator]
            state.offloaded = chosen
        self.per_unit[unit] = (state.saved_bytes, sum(s.nbytes for s in chosen))

    def _select(self, unit: Unit, state: _UnitState, keep: set[int]) -> list[_Stored]:
        """Largest exclusive storages first, each taken when it brings the total closer to α of the bytes."""
        target = self.config.ratio * state.saved_bytes
        cands = sorted((s for s in state.stored.values()
                        if s.nbytes >= self.config.min_bytes and s.ptr not in keep
                        and s.storage is not None and _use_count(s.storage) == 1),
                       key=lambda s: -s.nbytes)
        chosen, taken = [], 0
        for s in cands:
            if taken + s.nbytes <= target + s.nbytes / 2:
                chosen.append(s)
                taken += s.nbytes
        return chosen

    # ---- prefetch one compute action ahead; B: restore, release -------------------------------------
    def before_forward(self, unit: Unit) -> None:
        self._prefetch((Kind.F, unit))

    def before_backward(self, unit: Unit) -> None:
        state = self._units.get(unit)
        if state is not None and state.offloaded:
            if state.slot < 0:
                self._restore(unit, state, ahead=False)  # not prefetched: the copy is exposed
            self.mover.wait(state.ready)
        self._prefetch((Kind.B, unit))

    def _prefetch(self, action: tuple[Kind, Unit]) -> None:
        """Start restoring the unit of the B right after this action (while this action computes)."""
        nxt = self._next_b.get(action)
        state = self._units.get(nxt) if nxt is not None else None
        if state is not None and state.offloaded and state.slot < 0:
            self._restore(nxt, state, ahead=True)  # type: ignore[arg-type]

    def after_backward(self, unit: Unit) -> None:
        state = self._units.pop(unit, None)
        if state is not None and state.slot >= 0:
            self._free_events[state.slot] = self.mover.released()

    def _restore(self, unit: Unit, state: _UnitState, *, ahead: bool) -> None:
        busy = {s.slot for s in self._units.values() if s.slot >= 0}
        slot = next(i for i in range(len(self.buffers) + 1) if i not in busy)
        if slot == len(self.buffers):  # cannot happen with one prefetch ahead; keep going if it does
            self.buffers.append(None)
            self._free_events.append(None)
        size = sum(_aligned(s.nbytes) for s in state.offloaded)
        buf = self.buffers[slot]
        if buf is None or buf.numel() < size:
            buf = self.buffers[slot] = torch.empty(size, dtype=torch.uint8, device=self.device)
        parts, off = [], 0
        for s in state.offloaded:
            parts.append((off, s.host))
            s.storage, s.base = buf.untyped_storage(), off
            off += _aligned(s.nbytes)
        t0 = time.perf_counter()
        state.ready = self.mover.copy_in(buf, parts, self._free_events[slot])  # type: ignore[arg-type]
        self.host_copy_s += time.perf_counter() - t0
        for s in state.offloaded:
            s.host = None  # on CUDA the copy holds its own reference until it ran
        state.slot = slot
        self.restores.append((unit, ahead))
