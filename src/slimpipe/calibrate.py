"""`slimpipe calibrate`: measure what the cost model needs on this machine and write a profile JSON.

Measured, each as a function of the shapes the model uses (docs/calibrate.md):

* every linear layer of the model (forward; backward = dX + dW) at a few token counts;
* sliced causal attention through the runtime's own kernel path (``window_attention``) over a grid of
  slice length T and prefix length P, fitted per direction as ``a + b·F_prefix + c·F_diagonal``;
* the elementwise ops of a block (norms, RoPE, SwiGLU gate, residuals), the embedding and the loss per token;
* point-to-point latency and bandwidth between two processes (gloo over fork on CPU; on CUDA one GPU
  cannot host a 2-rank NCCL pipeline, so a device-to-device copy stands in and the cluster links come
  from the matching preset);
* whole units run by the runtime (LocalPipelineRuntime): their F/B times fit the composition factor κ and
  the per-action overhead that tie the kernel sum to what the executor really takes (CPU: per action
  from the trace; CUDA: per step, since the trace times only the asynchronous launches);
* the runtime's saved activation bytes per token (first, middle and last stage, per layer).

Single-threaded CPU runs are timed in thread CPU time, so other processes' load does not leak into the
profile (it describes this machine without other users); CUDA and multi-threaded runs in wall time.
The command module imports this lazily (it imports torch).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig
from slimpipe.schedule.actions import Kind, parse_action
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.hardware import (
    HARDWARE_PRESETS, PROFILE_FORMAT, ActivationFootprint, AttentionTime, CostProfile, GemmProfile, Hardware,
    LinearTime, elementwise_width,
)
from slimpipe.sim.workload import Workload

__all__ = ["CalibrateOptions", "calibrate", "fork_gloo", "unit_consistency", "benchmark_runtime", "Progress",
           "GRIDS"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrateOptions:
    """What one calibration run measures."""

    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    model: ModelConfig
    """Model whose shapes are measured."""
    threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""
    quick: bool = False
    """Fewer, smaller shapes and repetitions (tests; ~10 s)."""
    links: str = "auto"
    """CUDA: preset whose NVLink/NIC figures the profile keeps (auto: matched from the device name)."""
    concurrency: int = 1
    """CPU: measure while this many single-threaded processes run the same measurements at once (what each
    pipeline rank sees when all ranks compute; cores, caches and memory bandwidth are shared)."""


# Per device (and --quick): linear-layer token counts, attention (T, P) grid, elementwise and embedding/loss
# token counts, repetitions, p2p sizes, runtime runs (schedule, s, n; the first one tiny: the per-action
# overhead), layers of the model in those runs (0: all), and the tokens of the activation-footprint run.
GRIDS: dict[str, dict[str, object]] = {
    "cpu": dict(gemm=(64, 256, 1024), elem=(128, 512, 2048), ends=(128, 512, 2048), reps=5, unit_layers=0,
                p2p=(1 << 10, 1 << 16, 1 << 20, 1 << 23),
                # up to 4096 tokens unsliced and 512…1024-token slices after 3.5K of prefix (the validation range)
                attn=((64, 0), (64, 960), (256, 0), (256, 768), (256, 1792), (512, 0), (512, 1536), (512, 3584),
                      (1024, 0), (1024, 1024), (1024, 3072), (2048, 0), (4096, 0)),
                units=(("slimpipe", 32, 4), ("slimpipe", 1024, 4), ("1f1b", 512, 1)), foot_tokens=128),
    "cpu-quick": dict(gemm=(64, 256), elem=(64, 256), ends=(64, 256), reps=2, unit_layers=0,
                      p2p=(1 << 10, 1 << 20),
                      attn=((64, 0), (64, 192), (128, 0), (128, 384)),
                      units=(("slimpipe", 32, 2), ("slimpipe", 256, 2)),
                      foot_tokens=64),
    # CUDA: a vocabulary of 128K makes the loss inputs 12 B × T × V; runtime runs use 4 of the layers (the
    # per-layer work is the same; building and initialising a 16-layer model would cost seconds each).
    "cuda": dict(gemm=(1024, 4096, 16384), elem=(4096, 16384, 65536), ends=(1024, 4096, 8192), reps=5,
                 unit_layers=4, p2p=(1 << 20, 1 << 26, 1 << 28),
                 attn=((2048, 0), (2048, 6144), (2048, 30720), (8192, 0), (8192, 8192), (8192, 24576),
                       (16384, 0), (16384, 16384)),
                 units=(("slimpipe", 64, 2), ("slimpipe", 16384, 4)), foot_tokens=2048),
    "cuda-quick": dict(gemm=(1024, 4096), elem=(4096, 16384), ends=(1024, 4096), reps=3, unit_layers=4,
                       p2p=(1 << 20, 1 << 26),
                       attn=((2048, 0), (2048, 6144), (4096, 0), (4096, 4096)),
                       units=(("slimpipe", 64, 2), ("slimpipe", 8192, 2)),
                       foot_tokens=1024),
}


class Progress:
    """A one-line progress bar on stderr (one line per update when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None) -> None:
        stream = sys.stderr if stream is None else stream
        self.total, self.done, self.stream = total, 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        filled = int(30 * self.done / self.total)
        line = (f"calibrate [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.1f}s {label}")
        self.stream.write(("\r" + line.ljust(110)) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


# ---- timing and fitting ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class _Ctx:
    """Where and how one measurement process times things."""

    dev: torch.device
    """Device measured."""
    dt: torch.dtype
    """float32 (CPU) or bfloat16 (CUDA)."""
    reps: int
    """Timed repetitions per point (median), after one warm-up."""
    clock: Callable[[], float]
    """time.thread_time for single-threaded CPU runs (other processes' load does not count), else wall."""
    bar: Progress
    """Progress bar (a silent one in extra concurrent processes)."""

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def _time_fwd_bwd(make: Callable[[], tuple], forward: Callable, ctx: _Ctx) -> tuple[float, float]:
    """Median (forward, backward) seconds; fresh leaf inputs each repetition, one warm-up first."""
    fwd, bwd = [], []
    for r in range(ctx.reps + 1):
        inputs = make()
        ctx.sync()
        t0 = ctx.clock()
        outs = forward(*inputs)
        ctx.sync()
        t1 = ctx.clock()
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
        ctx.sync()
        t2 = ctx.clock()
        torch.autograd.backward(outs, grads)
        ctx.sync()
        t3 = ctx.clock()
        if r:
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
    return statistics.median(fwd), statistics.median(bwd)


def _nnls(rows: Sequence[Sequence[float]], ts: Sequence[float]) -> list[float]:
    """Least squares of relative error (rows scaled by 1/t) with non-negative coefficients."""
    a = torch.tensor(rows, dtype=torch.float64)
    t = torch.tensor(ts, dtype=torch.float64)
    w = 1.0 / t.clamp_min(1e-12)
    active = list(range(a.size(1)))
    while True:
        sol = torch.linalg.lstsq(a[:, active] * w[:, None], (t * w)[:, None]).solution[:, 0]
        if not active or float(sol.min()) >= 0:
            break
        del active[int(sol.argmin())]  # a negative coefficient is noise: pin it to 0 and refit the rest
    coef = [0.0] * a.size(1)
    for i, c in zip(active, sol.tolist()):
        coef[i] = c
    return coef


def _line(points: Sequence[tuple[float, float]]) -> LinearTime:
    """fixed + per_item·x through (x, t) points."""
    c = _nnls([(1.0, x) for x, _ in points], [t for _, t in points])
    return LinearTime(fixed_s=c[0], per_item_s=c[1])


# ---- kernel measurements ----------------------------------------------------------------------------------
def _gemm_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    h, q, kv, f = cfg.hidden, cfg.q_dim, cfg.kv_dim, cfg.ffn
    return list(dict.fromkeys([(h, q), (h, kv), (q, h), (h, f), (f, h), (h, cfg.vocab_size)]))


def _measure_gemms(cfg: ModelConfig, tokens: Sequence[int], ctx: _Ctx) -> list[dict]:
    out = []
    for fin, fout in _gemm_shapes(cfg):
        w = torch.randn(fout, fin, device=ctx.dev, dtype=ctx.dt) * fin ** -0.5
        pts = []
        for t in tokens:
            def make(t=t):
                return (torch.randn(1, t, fin, device=ctx.dev, dtype=ctx.dt, requires_grad=True),
                        w.detach().requires_grad_())
            f, b = _time_fwd_bwd(make, nn.functional.linear, ctx)
            pts.append({"tokens": t, "fwd_s": f, "bwd_s": b})
        out.append({"in_features": fin, "out_features": fout, "points": pts})
        ctx.bar.step(f"linear {fin}x{fout}")
    return out


def _measure_attention(cfg: ModelConfig, grid: Sequence[tuple[int, int]], ctx: _Ctx) -> list[dict]:
    """The runtime's kernel path: q of the slice against the K/V window [0, P + T), lower-right causal."""
    from slimpipe.runtime.attention import MaskCache, window_attention

    masks, seq = MaskCache("auto"), max(t + p for t, p in grid)  # one mask table, as in a real step
    out = []
    for t, p in grid:
        def make(t=t, p=p):
            def r(n, heads):  # (1, n, heads, head_dim)
                return torch.randn(1, n, heads, cfg.head_dim, device=ctx.dev, dtype=ctx.dt,
                                   requires_grad=True)
            return r(t, cfg.num_heads), r(p + t, cfg.num_kv_heads), r(p + t, cfg.num_kv_heads)
        f, b = _time_fwd_bwd(make, lambda q, k, v, p=p: window_attention(q, k, v, p, masks, seq), ctx)
        out.append({"tokens": t, "prefix": p, "fwd_s": f, "bwd_s": b})
        ctx.bar.step(f"attention T={t} P={p}")
    return out


def _measure_elementwise(cfg: ModelConfig, tokens: Sequence[int], ctx: _Ctx) -> list[dict]:
    from slimpipe.models.llama import RMSNorm, apply_rope, rope_tables

    dev, dt = ctx.dev, ctx.dt
    n1, n2 = RMSNorm(cfg.hidden, cfg.norm_eps).to(dev, dt), RMSNorm(cfg.hidden, cfg.norm_eps).to(dev, dt)
    out = []
    for t in tokens:
        cos, sin = rope_tables(0, t, cfg.head_dim, cfg.rope_theta, device=dev, dtype=dt)

        def make(t=t):
            def r(*shape):
                return torch.randn(1, t, *shape, device=dev, dtype=dt, requires_grad=True)
            return (r(cfg.hidden), r(cfg.num_heads, cfg.head_dim), r(cfg.num_kv_heads, cfg.head_dim),
                    r(cfg.ffn), r(cfg.ffn), r(cfg.hidden), r(cfg.hidden))

        def block_rest(x, q, k, a, b, attn_out, mlp_out, cos=cos, sin=sin):
            x2 = x + attn_out  # (1, t, h): the residual adds, norms, RoPE and gate of one block
            return (n1(x), apply_rope(q, cos, sin), apply_rope(k, cos, sin), n2(x2),
                    nn.functional.silu(a) * b, x2 + mlp_out)
        f, b = _time_fwd_bwd(make, block_rest, ctx)
        out.append({"tokens": t, "fwd_s": f, "bwd_s": b})
    ctx.bar.step("elementwise")
    return out


def _measure_ends(cfg: ModelConfig, tokens: Sequence[int], ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    from slimpipe.models.llama import RMSNorm

    dev, dt = ctx.dev, ctx.dt
    emb = nn.Embedding(cfg.vocab_size, cfg.hidden).to(dev, dt)
    norm = RMSNorm(cfg.hidden, cfg.norm_eps).to(dev, dt)
    embed, loss = [], []
    for t in tokens:
        ids = torch.randint(0, cfg.vocab_size, (1, t), device=dev)
        f, b = _time_fwd_bwd(lambda: (), lambda: emb(ids), ctx)
        embed.append({"tokens": t, "fwd_s": f, "bwd_s": b})
        labels = torch.randint(0, cfg.vocab_size, (t,), device=dev)

        def make(t=t):
            return (torch.randn(1, t, cfg.hidden, device=dev, dtype=dt, requires_grad=True),
                    torch.randn(1, t, cfg.vocab_size, device=dev, dtype=dt, requires_grad=True))

        def norm_and_ce(x, logits, labels=labels):  # the head GEMM between them is timed as a linear layer
            return norm(x), nn.functional.cross_entropy(logits.float().flatten(0, 1), labels, reduction="sum")
        f, b = _time_fwd_bwd(make, norm_and_ce, ctx)
        loss.append({"tokens": t, "fwd_s": f, "bwd_s": b})
    ctx.bar.step("embedding and loss")
    return embed, loss


# ---- point-to-point -------------------------------------------------------------------------------------
def fork_gloo(body: Callable, world: int, *args: object, timeout_s: float = 300.0) -> list[object]:
    """``body(rank, world, *args)`` on ``world`` forked single-threaded gloo ranks; their return values."""
    from slimpipe.runtime.forked import run_forked

    return run_forked(body, world, *args, timeout_s=timeout_s)


def _ping_pong(rank: int, world: int, sizes: Sequence[int]) -> list[dict]:
    out = []
    for size in sizes:
        buf = torch.zeros(max(1, size // 4), dtype=torch.float32)
        reps = max(3, min(30, (1 << 24) // size))
        times = []
        for r in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if r:
                times.append(time.perf_counter() - t0)
        out.append({"bytes": buf.numel() * 4, "one_way_s": statistics.median(times) / 2})
    return out


def _measure_p2p(dev: torch.device, sizes: Sequence[int], reps: int) -> list[dict]:
    """Wall time (a transfer is waiting, not computing)."""
    if dev.type == "cpu":
        return fork_gloo(_ping_pong, 2, sizes, timeout_s=120.0)[0]  # type: ignore[return-value]
    out = []  # one GPU: a device-to-device copy stands in for the NVLink/NCCL p2p it cannot run
    for size in sizes:
        a = torch.empty(size, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        out.append({"bytes": size, "one_way_s": statistics.median(times)})
    return out


# ---- the runtime: whole units and saved bytes -------------------------------------------------------------
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


def _timed_actions(rt, ctx: _Ctx) -> dict[str, list[float]]:
    """Time every action of a LocalPipelineRuntime with ctx.clock (its trace holds wall times only)."""
    times: dict[str, list[float]] = {}
    for ex in rt.executors:
        def run(idx, action, orig=ex._execute):
            t0 = ctx.clock()
            orig(idx, action)
            times.setdefault(str(action), []).append(ctx.clock() - t0)
        ex._execute = run  # an instance attribute: only this runtime's executors are timed
    return times


def _measure_units(cfg: ModelConfig, runs: Sequence[tuple[str, int, int]], ctx: _Ctx) -> list[dict]:
    from slimpipe.schedule.builders import build

    out = []
    for name, s, n in runs:
        rt = benchmark_runtime(cfg, build(name, p=2, m=2, n=n), ctx.dt, ctx.dev)
        tokens = torch.randint(0, cfg.vocab_size, (2, s + 1), generator=torch.Generator().manual_seed(0))
        rt.forward_backward(tokens)  # warm-up (allocator, mask table)
        rt.zero_grad()
        times = _timed_actions(rt, ctx)
        steps = []
        for _ in range(max(2, ctx.reps - 1)):
            ctx.sync()
            t0 = ctx.clock()
            rt.forward_backward(tokens)
            ctx.sync()
            steps.append(ctx.clock() - t0)
            rt.zero_grad()
        per: dict[tuple[int, int, Kind], list[float]] = {}
        for action, ts in times.items():
            a = parse_action(action)
            if a.kind in (Kind.F, Kind.B):
                per.setdefault((a.stage, a.seq_slice, a.kind), []).extend(ts)
        units = [{"stage": st, "slice": j, "fwd_s": statistics.median(per[(st, j, Kind.F)]),
                  "bwd_s": statistics.median(per[(st, j, Kind.B)])} for st in range(2) for j in range(n)]
        # On CUDA an action's host time is its asynchronous launches only: fit on whole (synchronised) steps.
        out.append({"schedule": name, "seq_len": s, "slices": n, "pp": 2, "microbatches": 2,
                    "layers": cfg.num_layers, "step_s": statistics.median(steps),
                    "per_action": ctx.dev.type == "cpu", "units": units})
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


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


# ---- fitting ----------------------------------------------------------------------------------------------
def _fit_kernels(cfg: ModelConfig, m: dict) -> dict[str, object]:
    """The CostProfile fields fitted from kernel measurements (everything but κ and the action overhead)."""
    gemms, all_f, all_b = [], [], []
    for g in m["gemm"]:
        size = 2 * g["in_features"] * g["out_features"]
        pf = [(size * p["tokens"], p["fwd_s"]) for p in g["points"]]
        pb = [(2 * size * p["tokens"], p["bwd_s"]) for p in g["points"]]
        all_f += pf
        all_b += pb
        gemms.append(GemmProfile(in_features=g["in_features"], out_features=g["out_features"], fwd=_line(pf),
                                 bwd=_line(pb)))
    q = cfg.q_dim
    rows = [(1.0, 4 * q * a["tokens"] * a["prefix"], 2 * q * a["tokens"] ** 2 * (a["prefix"] == 0),
             2 * q * a["tokens"] ** 2 * (a["prefix"] > 0)) for a in m["attention"]]
    attn = {}
    for d in ("fwd", "bwd"):
        c = _nnls(rows, [a[f"{d}_s"] for a in m["attention"]])
        attn[d] = AttentionTime(fixed_s=c[0], prefix_s=c[1], diagonal_s=c[2], masked_diagonal_s=c[3])
    width = elementwise_width(cfg.hidden, cfg.q_dim, cfg.kv_dim, cfg.ffn)

    def per_token(points, scale, d):
        return _line([(p["tokens"] * scale, p[f"{d}_s"]) for p in points])
    return dict(
        model_width=width, gemms=tuple(gemms), gemm_fwd=_line(all_f), gemm_bwd=_line(all_b),
        attn_fwd=attn["fwd"], attn_bwd=attn["bwd"],
        elementwise_fwd=per_token(m["elementwise"], width, "fwd"),
        elementwise_bwd=per_token(m["elementwise"], width, "bwd"),
        embed_fwd=per_token(m["embed"], cfg.hidden, "fwd"),
        embed_bwd=per_token(m["embed"], cfg.hidden, "bwd"),
        loss_fwd=per_token(m["loss"], cfg.vocab_size, "fwd"),
        loss_bwd=per_token(m["loss"], cfg.vocab_size, "bwd"),
    )


def _unit_cost(cfg: ModelConfig, run: dict, hw: Hardware) -> AnalyticCost:
    cfg = cfg.replace(num_layers=run.get("layers", cfg.num_layers))
    wl = Workload(model=cfg, parallel=ParallelConfig(pp=run["pp"], slices=run["slices"]),
                  seq_len=run["seq_len"], global_batch=run["microbatches"])
    return AnalyticCost(wl, hw, [1 / run["slices"]] * run["slices"])


def _fit_composition(cfg: ModelConfig, runs: list[dict], hw: Hardware) -> tuple[float, float, float, float]:
    """(κ_fwd, κ_bwd, action_fwd_s, action_bwd_s): measured runtime unit = action + κ · Σ kernels.

    Not one joint least-squares fit, which trades κ against the overhead on a noisy machine: the overhead
    is the median of (unit − κ·kernels) over the tiny units (the first run, a few tokens per slice), κ
    the median of (unit − overhead) / kernels over the other runs; the two are alternated a few times.
    Where the overhead clamps at zero (the micro-benchmarks' fixed costs already exceed the tiny units),
    κ is refitted over all units so the profile still reproduces its own runs.
    """
    pts: list[tuple[bool, float, float, float, float]] = []  # (tiny run, pred F, meas F, pred B, meas B)
    step_meas = step_pred = 0.0
    for i, run in enumerate(runs):
        cost = _unit_cost(cfg, run, hw)
        for u in run["units"]:
            pf = cost.compute_time(Kind.F, u["stage"], u["slice"])
            pb = cost.compute_time(Kind.B, u["stage"], u["slice"])
            pts.append((i == 0, pf, u["fwd_s"], pb, u["bwd_s"]))
            step_pred += run["microbatches"] * (pf + pb)
        step_meas += run["step_s"]
    if not all(r["per_action"] for r in runs):  # CUDA: one factor from whole steps, no per-action term
        k = step_meas / step_pred
        return k, k, 0.0, 0.0
    out = []
    for pi, mi in ((1, 2), (3, 4)):
        k, over = 1.0, 0.0
        for _ in range(5):  # alternate: o from the tiny units given κ, κ from the others given o
            over = max(0.0, statistics.median(p[mi] - k * p[pi] for p in pts if p[0]))
            k = statistics.median((p[mi] - over) / p[pi] for p in pts if not p[0])
        if over == 0.0:  # kernel fixed costs already exceed the tiny units: κ alone must fit every unit
            k = statistics.median(p[mi] / p[pi] for p in pts)
        out.append((k, over))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def unit_consistency(hw: Hardware, doc: dict) -> list[dict]:
    """Predicted vs measured runtime times of the profile's own unit runs (per action; CUDA: per step)."""
    cfg = ModelConfig(**doc["meta"]["model_config"])
    rows = []
    for run in doc["measurements"]["units"]:
        cost = _unit_cost(cfg, run, hw)
        tag = f"{run['schedule']} s={run['seq_len']} n={run['slices']}"
        if not run["per_action"]:
            pred = sum(run["microbatches"] * (cost.compute_time(Kind.F, u["stage"], u["slice"])
                                              + cost.compute_time(Kind.B, u["stage"], u["slice"]))
                       for u in run["units"])
            rows.append({"what": f"{tag} step", "measured_s": run["step_s"], "predicted_s": pred})
            continue
        for u in run["units"]:
            for kind, key in ((Kind.F, "fwd_s"), (Kind.B, "bwd_s")):
                rows.append({"what": f"{tag} {u['stage']}{kind.value}.{u['slice']}", "measured_s": u[key],
                             "predicted_s": cost.compute_time(kind, u["stage"], u["slice"])})
    for r in rows:
        r["ratio"] = r["predicted_s"] / r["measured_s"]
    return rows


# ---- the whole run ----------------------------------------------------------------------------------------
def _measure_compute(rank: int, cfg: ModelConfig, grid: dict, dev: torch.device, bar: Progress,
                     threads: int) -> tuple[dict, ActivationFootprint]:
    """Everything but p2p; with several concurrent processes only rank 0 drives the progress bar."""
    if threads:
        torch.set_num_threads(threads)
    single = dev.type == "cpu" and torch.get_num_threads() == 1
    ctx = _Ctx(dev=dev, dt=torch.float32 if dev.type == "cpu" else torch.bfloat16, reps=int(grid["reps"]),
               clock=time.thread_time if single else time.perf_counter,
               bar=bar if rank == 0 else Progress(1 << 30, stream=open(os.devnull, "w")))
    torch.manual_seed(0)
    m: dict[str, object] = {"clock": "thread CPU time" if single else "wall"}
    m["gemm"] = _measure_gemms(cfg, grid["gemm"], ctx)
    m["attention"] = _measure_attention(cfg, grid["attn"], ctx)
    m["elementwise"] = _measure_elementwise(cfg, grid["elem"], ctx)
    m["embed"], m["loss"] = _measure_ends(cfg, grid["ends"], ctx)
    layers = int(grid["unit_layers"]) or cfg.num_layers
    m["units"] = _measure_units(cfg.replace(num_layers=layers), grid["units"], ctx)
    return m, _measure_footprint(cfg, int(grid["foot_tokens"]), ctx)


def _fork_child(rank: int, tmp: str, fn: Callable, args: tuple) -> None:
    with open(os.path.join(tmp, f"out{rank}.pkl"), "wb") as fh:
        pickle.dump(fn(rank, *args), fh)


def _fork_all(fn: Callable, n: int, *args: object) -> list:
    """``fn(rank, *args)`` in n forked processes at once; their results by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_fork_child, args=(tmp, fn, args), nprocs=n, start_method="fork", join=True)
        out = []
        for r in range(n):
            with open(os.path.join(tmp, f"out{r}.pkl"), "rb") as fh:
                out.append(pickle.load(fh))
        return out


def _hardware_fields(cfg: ModelConfig, m: dict, dev: torch.device, links: str) -> dict[str, object]:
    """Measured peak and efficiencies; links measured (CPU) or from a preset (CUDA, see the docstring)."""
    layer_shapes = set(_gemm_shapes(cfg)[:-1])  # without the head
    peak = agg_flops = agg_time = 0.0
    for g in m["gemm"]:
        top = max(g["points"], key=lambda p: p["tokens"])
        flops = 2 * top["tokens"] * g["in_features"] * g["out_features"]
        peak = max(peak, flops / top["fwd_s"])
        if (g["in_features"], g["out_features"]) in layer_shapes:
            agg_flops, agg_time = agg_flops + flops, agg_time + top["fwd_s"]
    big = max(m["attention"], key=lambda a: a["tokens"] * (a["prefix"] + a["tokens"] / 2))
    attn_rate = 4 * cfg.q_dim * big["tokens"] * (big["prefix"] + big["tokens"] / 2) / big["fwd_s"]
    fit = _line([(p["bytes"], p["one_way_s"]) for p in m["p2p"]])
    bw = 1.0 / max(fit.per_item_s, 1e-15)
    out: dict[str, object] = dict(peak_flops=peak, gemm_efficiency=min(1.0, agg_flops / agg_time / peak),
                                  attention_efficiency=max(1e-3, min(1.0, attn_rate / peak)))
    if dev.type == "cpu":
        out.update(hbm_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                   gpus_per_node=os.cpu_count() or 1, intra_node_bw=bw, inter_node_bw=bw,
                   p2p_latency_s=fit.fixed_s)
    else:
        preset = HARDWARE_PRESETS[_links_preset(links, torch.cuda.get_device_name(dev))]
        out.update(hbm_bytes=float(torch.cuda.get_device_properties(dev).total_memory),
                   gpus_per_node=preset.gpus_per_node, intra_node_bw=preset.intra_node_bw,
                   inter_node_bw=preset.inter_node_bw, p2p_latency_s=preset.p2p_latency_s)
    return out


def _links_preset(links: str, device_name: str) -> str:
    if links != "auto":
        if links not in HARDWARE_PRESETS:
            raise ConfigError(f"--links {links!r} is unknown: use auto or one of {sorted(HARDWARE_PRESETS)}")
        return links
    name = device_name.lower()
    return next((k for k in ("h800", "h200", "h100", "a100") if k in name), "h100")


def calibrate(opts: CalibrateOptions, *, progress: Progress | None = None) -> dict:
    """Measure everything and return the profile document (``load_profile``/``load_hardware`` read it)."""
    if opts.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {opts.device!r} is unknown: use cpu or cuda")
    if opts.concurrency > 1 and opts.device != "cpu":
        raise ConfigError("--concurrency applies to --device cpu only: use --concurrency 1 on cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
    dev = torch.device(opts.device)
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    grid = GRIDS[opts.device + ("-quick" if opts.quick else "")]
    cfg, reps = opts.model, int(grid["reps"])  # type: ignore[call-overload]
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)
    steps = 4 + len(_gemm_shapes(cfg)) + len(grid["attn"]) + len(grid["units"])  # type: ignore[arg-type]
    bar = progress or Progress(steps)
    t0, load0 = time.perf_counter(), os.getloadavg()
    try:
        m: dict[str, object] = {"p2p": _measure_p2p(dev, grid["p2p"], reps)}  # type: ignore[arg-type]
        bar.step("p2p")  # first: forked children start before this process has run parallel kernels
        if opts.concurrency > 1:
            m_rest, footprint = _fork_all(_measure_compute, opts.concurrency, cfg, grid, dev, bar,
                                          opts.threads or 1)[0]
        else:
            m_rest, footprint = _measure_compute(0, cfg, grid, dev, bar, 0)
        m.update(m_rest)
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
    p2p = _line([(p["bytes"], p["one_way_s"]) for p in m["p2p"]])  # type: ignore[union-attr]
    prof = dict(device=dev.type, dtype=str(dt).removeprefix("torch."), dtype_bytes=_itemsize(dt),
                threads=opts.threads or (1 if opts.concurrency > 1 else threads_before), model=cfg.name,
                **_fit_kernels(cfg, m), compose_fwd=1.0, compose_bwd=1.0, action_fwd_s=0.0, action_bwd_s=0.0,
                p2p_latency_s=p2p.fixed_s,
                p2p_bandwidth=1.0 / max(p2p.per_item_s, 1e-15), footprint=footprint)
    fields = _hardware_fields(cfg, m, dev, opts.links)
    kernels_only = Hardware(**fields, profile=CostProfile(**prof))  # type: ignore[arg-type]
    kf, kb, af, ab = _fit_composition(cfg, m["units"], kernels_only)  # type: ignore[arg-type]
    prof.update(compose_fwd=kf, compose_bwd=kb, action_fwd_s=af, action_bwd_s=ab)
    hw = Hardware(**fields, profile=CostProfile(**prof))  # type: ignore[arg-type]
    doc = {
        "format": PROFILE_FORMAT,
        "hardware": {k: v for k, v in hw.to_dict().items() if k not in ("name", "profile")},
        "profile": dataclasses.asdict(hw.profile),
        "measurements": m,
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": opts.device,
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else f"{os.cpu_count()}-core CPU"),
            "torch": torch.__version__, "quick": opts.quick, "elapsed_s": time.perf_counter() - t0,
            "concurrency": opts.concurrency, "clock": m["clock"],
            "load_before": load0, "load_after": os.getloadavg(), "model_config": cfg.to_dict(),
            "p2p_note": ("gloo between two forked processes" if dev.type == "cpu" else
                         "device-to-device copy on one GPU (stand-in: one GPU cannot run a 2-rank NCCL "
                         "pipeline); hardware links come from the matching preset"),
        },
    }
    rows = unit_consistency(hw, doc)
    ratios = sorted(r["ratio"] for r in rows)
    doc["consistency"] = {"rows": len(rows), "median_ratio": statistics.median(ratios),
                          "min_ratio": ratios[0], "max_ratio": ratios[-1]}
    return doc
