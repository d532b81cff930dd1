"""Refuse a run that cannot fit in memory before any process starts, saying how much it would need. No torch.

The estimate is the simulator's memory model (sim/memory.py, the published SlimPipe model whose activation
bytes match the runtime's own accounting, BENCHMARKS.md) read for the schedule the ranks will run, rescaled
from its bf16 convention to the run's dtype, plus the int64 global batch every rank loads. It is rough by
design (allocator slack, autograd temporaries and the attention kernels' workspaces are not in it), so
only runs that exceed the machine's whole memory are refused; a run that fits the estimate can still run
out of memory.
"""

from __future__ import annotations

import os
from typing import Any

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig

__all__ = ["step_memory_bytes", "check_memory"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


def step_memory_bytes(cfg: Any, model: ModelConfig, layout: ParallelConfig, schedule: Any) -> list[float]:
    """Estimated peak bytes of each pipeline rank of ``cfg`` running ``schedule`` (compute-only)."""
    from slimpipe.sim.memory import memory_model
    from slimpipe.sim.workload import Workload

    wl = Workload(model=model, parallel=layout, seq_len=cfg.seq_len, global_batch=cfg.global_batch,
                  vocab_parallel=cfg.vocab_parallel, recompute=cfg.recompute)
    scale = _DTYPE_BYTES[cfg.dtype] / 2  # the model counts bf16 activations and 18 B/param (mixed precision)
    states = _DTYPE_BYTES[cfg.dtype] * 4 / 18  # AdamW in the run's dtype: weight, grad, two moments
    batch = cfg.global_batch * (cfg.seq_len + 1) * 8  # (B, s+1) int64 on every rank
    out = []
    for mb in memory_model(wl, schedule):
        acts = (mb.activations + mb.kv_grad + mb.kv_cache + mb.recomputed) * scale + mb.output
        out.append(acts + (mb.params_grads + mb.optimizer) * states + batch)
    return out


def check_memory(cfg: Any, model: ModelConfig, layout: ParallelConfig, schedule: Any, *, local_procs: int,
                 device_bytes: float | None = None) -> None:
    """Refuse when the estimate exceeds this host's RAM (CPU: all local ranks share it; one process runs
    every rank with --local-pipeline) or one GPU's memory (``device_bytes``)."""
    per_rank = step_memory_bytes(cfg, model, layout, schedule)
    if device_bytes is not None:  # one GPU per rank, or every rank on one GPU with --local-pipeline
        need = sum(per_rank) if cfg.local_pipeline else max(per_rank)
        have, where = device_bytes, "one GPU has"
    else:
        need = sum(per_rank) if cfg.local_pipeline else max(per_rank) * local_procs
        have, where = _host_bytes(), f"{local_procs} process(es) share this host's"
    if have and need > have:
        raise ConfigError(
            f"--seq-len={cfg.seq_len} × --global-batch={cfg.global_batch} needs ~{_size(need)} for one step "
            f"(memory model; the busiest rank {_size(max(per_rank))}) but {where} {_size(have)}: use a "
            "shorter --seq-len or a smaller --global-batch, or spread it over more --slices/--pp"
        )


def _host_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return 0.0


def _size(b: float) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b / 2**20:,.0f} MiB"
