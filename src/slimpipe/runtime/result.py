"""What a step returns: StepResult and its TraceEvents; PipelineError for failures inside a step."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepResult", "TraceEvent", "PipelineError"]


class PipelineError(RuntimeError):
    """An action failed. The message names rank, step and action and carries the rank's schedule grid with
    the failing step marked; ``__cause__`` is the original exception."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One executed action."""

    rank: int
    """Pipeline rank that ran it."""
    action: str
    """The schedule's string form, e.g. ``2F3.1`` or ``1SEND_F0.2``."""
    start_s: float
    """Wall-clock start (time.time())."""
    end_s: float
    """Wall-clock end."""
    cpu_s: float = 0.0
    """Thread CPU seconds the action took on this process (``time.thread_time``): ≤ end − start, the rest
    was waiting (a RECV) or the process being descheduled. On CUDA: the host's launch work only."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    """Outcome of one forward_backward or train_step."""

    loss: float
    """Mean loss over every token of the global batch (all DP replicas); identical on every rank."""
    grad_norm: float
    """Global L2 grad norm before clipping (tied weights once); nan for forward_backward."""
    step_time_s: float
    """Wall time of the schedule execution on this process (the slowest rank, gathered)."""
    trace: list[TraceEvent]
    """Executed actions in order: this rank's (distributed) or every rank's (local runtime)."""
    peak_activation_bytes: list[int]
    """Per pipeline rank: peak of resident saved activations + K/V blocks + dK/dV accumulators (+ offload
    restore buffers): the device memory activations hold."""
    peak_kv_bytes: list[int]
    """Per pipeline rank: peak of K/V blocks + dK/dV accumulators."""
    peak_saved_bytes: list[int]
    """Per pipeline rank: peak saved-for-backward bytes alone (storage-deduplicated, parameters excluded)."""
    busy_s: list[float]
    """Per pipeline rank: total duration of its compute actions (F, B)."""
    bubble_ratio: float
    """1 − Σ busy / (p · step_time_s)."""
    cuda_max_allocated: list[int] | None
    """Per pipeline rank torch.cuda.max_memory_allocated (local runtime: one entry, the whole process)."""
    peak_offloaded_bytes: list[int] | None = None
    """Per pipeline rank: peak saved-activation bytes held in host memory (activation offload; 0 without)."""
    offload_copy_s: list[float] | None = None
    """Per pipeline rank: seconds of offload copies (CUDA: side-stream time; CPU: synchronous copies)."""
    offload_exposed_s: list[float] | None = None
    """Per pipeline rank: seconds compute waited for offload copies (CPU: all of them, nothing overlaps)."""
