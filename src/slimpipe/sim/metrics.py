"""Step-level figures from a simulated Timeline: step time, bubble, tokens/s, MFU, memory over time.

MFU conventions (``ModelConfig.flops_per_token``; always labelled in reports):
  * ``mfu``         : the FLOPs the hardware executes: 6·N + 6·L·H·Q·T per token (causal attention counted
                      as executed, s²/2 query-key pairs), N = active parameters without the input embedding.
  * ``mfu_dense``   : the PaLM appendix B / torchtitan convention 6·N + 12·L·H·Q·T (attention counted as if
                      unmasked; at long context about 2× ``mfu``, and it can exceed what the GPU can run).
  MFU = FLOPs/token × tokens/s / (GPUs × peak bf16 FLOP/s of the hardware preset, 989e12 for H100/H800).
Recomputation is not counted (that would be HFU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slimpipe.schedule.actions import Kind
from slimpipe.sim.documents import expected_slice_pairs
from slimpipe.sim.hardware import Hardware
from slimpipe.sim.memory import GIB, MemoryBreakdown, activation_bytes_per_token, unit_bytes
from slimpipe.sim.simulator import Timeline
from slimpipe.sim.workload import Workload

__all__ = ["Report", "summarize", "memory_curve", "MFU_CONVENTION"]

MFU_CONVENTION = (
    "mfu: executed FLOPs, 6N + 6·L·H·Q·T per token (causal attention as run, N without input embedding); "
    "mfu_dense: 6N + 12·L·H·Q·T (PaLM/torchtitan, attention as if unmasked); peak = dense bf16 FLOP/s"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """Everything `slimpipe simulate` prints for one configuration."""

    step_time_s: float
    """Pipeline makespan plus the per-step data-parallel sync (uniform cost: in units of one F)."""
    pipeline_time_s: float
    """Makespan of the simulated schedule alone."""
    dp_sync_s: float
    """Data-parallel gradient/parameter sync added after the pipeline (not overlapped)."""
    bubble_ratio: float
    """Idle fraction of total pipeline rank-time, 1 − Σ busy / (p · makespan)."""
    tokens_per_s: float
    """Global-batch tokens per second of step time (all GPUs)."""
    mfu: float | None
    """Model FLOPs utilisation of the executed FLOPs (causal 6·L·H·Q·T term); None for the uniform cost."""
    mfu_dense: float | None
    """Model FLOPs utilisation, dense PaLM/torchtitan 12·L·H·Q·T term; None for the uniform cost."""
    gpus: int
    """t·c·p·d."""
    memory: tuple[MemoryBreakdown, ...]
    """Per pipeline rank."""
    busy_s: tuple[float, ...]
    """Per rank compute time."""
    hbm_bytes: float | None
    """Device memory of the hardware (None for the uniform cost)."""

    @property
    def peak_rank(self) -> int:
        """The pipeline rank whose GPUs have the highest peak memory."""
        return max(self.memory, key=lambda mb: (mb.peak, -mb.rank)).rank

    def to_dict(self) -> dict[str, object]:
        top = self.memory[self.peak_rank]
        return {
            "step_time_s": self.step_time_s,
            "pipeline_time_s": self.pipeline_time_s,
            "dp_sync_s": self.dp_sync_s,
            "bubble_ratio": self.bubble_ratio,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_gpu": self.tokens_per_s / self.gpus,
            "mfu": self.mfu,
            "mfu_dense": self.mfu_dense,
            "mfu_convention": MFU_CONVENTION,
            "gpus": self.gpus,
            "peak_rank": self.peak_rank,
            "memory_gib": top.gib(),
            "fits_hbm": None if self.hbm_bytes is None else top.peak <= self.hbm_bytes,
            "ranks": [
                {"rank": mb.rank, "busy_s": self.busy_s[mb.rank], "peak_inflight_units": mb.peak_inflight,
                 "memory_gib": mb.gib()}
                for mb in self.memory
            ],
        }


def summarize(workload: Workload, timeline: Timeline, memory: Sequence[MemoryBreakdown], *,
              hardware: Hardware | None, dp_sync_s: float = 0.0) -> Report:
    """Combine a timeline and the memory model into a Report (hardware None: uniform cost, no MFU)."""
    step = timeline.makespan + dp_sync_s
    tps = workload.tokens_per_step / step if step > 0 else 0.0
    gpus = workload.parallel.gpus
    mfu = mfu_dense = None
    if hardware is not None:
        denom = gpus * hardware.peak_flops
        keys = None  # packed documents: the mean keys a query sees under document-causal attention
        if workload.documents is not None:
            keys = sum(expected_slice_pairs(workload.documents, [0, workload.seq_len])[0]) / workload.seq_len
        mfu = workload.model.flops_per_token(workload.seq_len, keys_per_query=keys) * tps / denom
        mfu_dense = workload.model.flops_per_token(workload.seq_len, causal=False) * tps / denom
    return Report(
        step_time_s=step, pipeline_time_s=timeline.makespan, dp_sync_s=dp_sync_s,
        bubble_ratio=timeline.bubble_ratio, tokens_per_s=tps, mfu=mfu, mfu_dense=mfu_dense, gpus=gpus,
        memory=tuple(memory), busy_s=timeline.busy,
        hbm_bytes=None if hardware is None else hardware.hbm_bytes,
    )


def memory_curve(workload: Workload, timeline: Timeline,
                 memory: MemoryBreakdown) -> tuple[list[float], list[float]]:
    """(times, GiB) of one rank's memory over the step: fixed terms + on-GPU bytes of in-flight units.

    A unit's activations (and K/V cache under full recompute) appear when its F starts and are freed
    when its B ends; output, recomputed and K/V-gradient buffers are drawn as constant (their peak).
    """
    r = memory.rank
    sched = timeline.schedule
    a, _ = activation_bytes_per_token(workload)
    if memory.kv_cache > 0:
        a += 4 * workload.model.kv_dim / (1 - workload.offload)  # K/V cache is never offloaded
    fracs = sched.slice_fractions()
    per_slice = [(1 - workload.offload) * unit_bytes(workload, a, w) for w in fracs]
    base = memory.params_grads + memory.optimizer + memory.output + memory.recomputed + memory.kv_grad
    events: list[tuple[float, float]] = []
    for i, act in enumerate(sched.ranks[r]):
        if act.kind is Kind.F:
            events.append((timeline.start[r][i], per_slice[act.seq_slice]))
        elif act.kind is Kind.B:
            events.append((timeline.end[r][i], -per_slice[act.seq_slice]))
    events.sort(key=lambda e: (e[0], e[1]))  # frees before allocations at the same instant
    times, values, cur = [0.0], [base / GIB], base
    for t, delta in events:
        cur += delta
        times.append(t)
        values.append(cur / GIB)
    times.append(timeline.makespan)
    values.append(cur / GIB)
    return times, values
