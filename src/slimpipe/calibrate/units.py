"""Whole units run by the local runtime (LocalPipelineRuntime): F/B times per (stage, slice) on CUDA (one
GPU cannot host a 2-rank pipeline; on CPU the 2-rank executor run measures them, executor.py), and the
runtime's own saved-bytes accounting per token and stage kind (the activation footprint).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from slimpipe.calibrate.measure import _Ctx, _itemsize
from slimpipe.config import ModelConfig
from slimpipe.schedule.actions import Kind, parse_action
from slimpipe.sim.hardware import ActivationFootprint

__all__ = ["benchmark_runtime"]


def benchmark_runtime(cfg: ModelConfig, sched, dt: torch.dtype, dev: torch.device):
    """LocalPipelineRuntime with random weights drawn on the device: timing and memory do not depend on
    the values, and the runtime's reproducible per-name CPU initialisation costs seconds per 1B parameters."""
    import slimpipe.runtime.stage as stage
    from slimpipe.runtime import LocalPipelineRuntime

    keep = stage.init_parameters
    stage.init_parameters = lambda *args, **kw: None
    try:
        rt = LocalPipelineRuntime(cfg, sched, dtype=dt, device=dev)
    finally:
        stage.init_parameters = keep
    with torch.no_grad():
        for model in rt.models:
            for name, param in model.named_parameters():
                param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return rt


def _record(times: dict[str, list[float]], trace, ctx: _Ctx) -> None:
    """Append every action's time from a step's trace: thread CPU time where ctx times in CPU time,
    else wall time (on CUDA the host's launches only: the fit then uses whole synchronised steps)."""
    cpu = ctx.clock is time.thread_time
    for e in trace:
        times.setdefault(e.action, []).append(e.cpu_s if cpu else e.end_s - e.start_s)


def _unit_medians(times: dict[str, list[float]], n: int) -> list[dict]:
    """Median F/B seconds per (stage, slice) of a p = 2 run from the per-action samples."""
    per: dict[tuple[int, int, Kind], list[float]] = {}
    for action, ts in times.items():
        a = parse_action(action)
        if a.kind in (Kind.F, Kind.B):
            per.setdefault((a.stage, a.seq_slice, a.kind), []).extend(ts)
    return [{"stage": st, "slice": j, "fwd_s": statistics.median(per[(st, j, Kind.F)]),
             "bwd_s": statistics.median(per[(st, j, Kind.B)])} for st in range(2) for j in range(n)]


def _measure_units(cfg: ModelConfig, runs: Sequence[tuple[str, int, int]], ctx: _Ctx) -> list[dict]:
    from slimpipe.schedule.builders import build

    out = []
    for name, s, n in runs:
        rt = benchmark_runtime(cfg, build(name, p=2, m=2, n=n), ctx.dt, ctx.dev)
        tokens = torch.randint(0, cfg.vocab_size, (2, s + 1), generator=torch.Generator().manual_seed(0))
        rt.forward_backward(tokens)  # warm-up (allocator, mask table)
        rt.zero_grad()
        times: dict[str, list[float]] = {}
        steps = []
        for _ in range(max(2, ctx.reps - 1)):
            ctx.sync()
            t0 = ctx.clock()
            res = rt.forward_backward(tokens)
            ctx.sync()
            steps.append(ctx.clock() - t0)
            _record(times, res.trace, ctx)
            rt.zero_grad()
        # On CUDA an action's host time is its asynchronous launches only: fit on whole (synchronised) steps.
        out.append({"schedule": name, "seq_len": s, "slices": n, "pp": 2, "microbatches": 2,
                    "layers": cfg.num_layers, "step_s": statistics.median(steps),
                    "per_action": ctx.dev.type == "cpu", "units": _unit_medians(times, n)})
        ctx.bar.step(f"runtime {name} s={s} n={n}")
    return out


def _measure_footprint(cfg: ModelConfig, tokens: int, ctx: _Ctx) -> ActivationFootprint:
    """Saved bytes of one unit per stage kind, from the runtime's own accounting (1 and 2 layers/stage)."""
    from slimpipe.schedule.builders import build

    sched = build("1f1b", p=3, m=1)  # rank 0 first, rank 1 middle, rank 2 last stage; one unit each
    ids = torch.randint(0, cfg.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    saved = {}
    for per in (1, 2):
        rt = benchmark_runtime(cfg.replace(num_layers=3 * per), sched, ctx.dt, ctx.dev)
        saved[per] = rt.forward_backward(ids).peak_saved_bytes
    per_layer = statistics.mean(saved[2][r] - saved[1][r] for r in range(3)) / tokens
    extra = [saved[1][r] / tokens - per_layer for r in range(3)]
    ctx.bar.step("activation footprint")
    return ActivationFootprint(per_layer=per_layer, first_stage=extra[0], middle_stage=extra[1],
                               last_stage=extra[2], kv_per_layer=2 * cfg.kv_dim * _itemsize(ctx.dt))
