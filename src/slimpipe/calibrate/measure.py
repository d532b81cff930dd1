"""Kernel measurements of one calibration process: linear layers, sliced attention, elementwise, ends.

Every point is a median over ``reps`` repetitions after one warm-up, forward and backward timed apart
with fresh leaf inputs; ``_Ctx.clock`` is the thread's CPU time for single-threaded CPU runs (other
processes' load does not leak in) and wall time otherwise (CUDA synchronised around each phase).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimpipe.config import ModelConfig

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr; silent when stderr is not a terminal (logs get the summary)."""

    def __init__(self, total: int, stream=None) -> None:
        stream = sys.stderr if stream is None else stream
        self.total, self.done, self.stream = total, 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        if not self.tty:
            return
        filled = int(30 * self.done / self.total)
        line = (f"calibrate [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.1f}s {label}")
        self.stream.write("\r" + line.ljust(110))
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


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


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


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


def _gemm_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of the block's distinct linear layers, then the output layer (last)."""
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
    """The runtime's kernel path (runtime/slice_attention.py): a slice of T queries over its own block,
    square causal, and a prefix of P tokens held as the K/V store holds it, one block of T tokens per
    earlier slice, each block one fused call merged by log-sum-exp; the backward hands each prefix block's
    dK/dV to an accumulator as the store does. A single P-token prefix call (what was timed before)
    took 0.43–0.46× the blocks' forward time at T = 64 after 15 blocks, 0.77–0.78× at T = 128 after 3,
    0.91–0.98× at T = 512…1024 after 3 (bench/calibrate_attention_paths.py, BENCHMARKS "Simulator
    validation", F)."""
    from slimpipe.runtime.attention import MaskCache
    from slimpipe.runtime.slice_attention import Window, slice_attention

    masks = MaskCache("auto")
    out = []
    for t, p in grid:
        def make(t=t, p=p):
            def r(n, heads, grad=True):  # (1, n, heads, head_dim)
                return torch.randn(1, n, heads, cfg.head_dim, device=ctx.dev, dtype=ctx.dt,
                                   requires_grad=grad)
            sizes = [min(t, p - lo) for lo in range(0, p, t)]  # earlier slices' blocks
            acc = [[torch.zeros(1, n, cfg.num_kv_heads, cfg.head_dim, device=ctx.dev, dtype=ctx.dt)
                    for _ in "kv"] for n in sizes]

            def deposit(i, dk, dv, row=0, acc=acc):  # the store's accumulators of block i
                acc[i][0][:, row:row + dk.size(1)].add_(dk)
                acc[i][1][:, row:row + dv.size(1)].add_(dv)
            window = Window(prefix_k=[r(n, cfg.num_kv_heads, False) for n in sizes],
                            prefix_v=[r(n, cfg.num_kv_heads, False) for n in sizes],
                            handed=lambda: (None, None), deposit=deposit)
            return r(t, cfg.num_heads), r(t, cfg.num_kv_heads), r(t, cfg.num_kv_heads), window
        f, b = _time_fwd_bwd(make, lambda q, k, v, w: slice_attention(q, k, v, w, masks), ctx)
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
