"""The pipeline runtime: executes lowered slimpipe schedules on torch (distributed or in one process).

Public surface (see docs/runtime.md)::

    state = ParallelState.create(pp=2, dp=2, timeout_s=60.0)     # after init_process_group
    rt = PipelineRuntime(model_cfg, schedule, state, dtype=torch.float32, seed=0, optim=OptimConfig())
    res = rt.train_step(tokens)                                   # tokens (m, s+1) per DP replica
    local = LocalPipelineRuntime(model_cfg, schedule, dtype=torch.float64)   # all ranks, one process
"""

from __future__ import annotations

from slimpipe.runtime.kv import KVOrderError
from slimpipe.runtime.local import LocalPipelineRuntime
from slimpipe.runtime.memory import MemoryPeaks
from slimpipe.runtime.optim import OptimConfig
from slimpipe.runtime.parallel_state import ParallelState
from slimpipe.runtime.pipeline import PipelineRuntime
from slimpipe.runtime.result import PipelineError, StepResult, TraceEvent
from slimpipe.runtime.stage import build_reference, reference_loss, slice_bounds, stages_of_rank

__all__ = [
    "ParallelState", "PipelineRuntime", "LocalPipelineRuntime", "StepResult", "TraceEvent", "OptimConfig",
    "PipelineError", "KVOrderError", "MemoryPeaks", "build_reference", "reference_loss", "slice_bounds",
    "stages_of_rank",
]
