"""Helpers of the runtime tests: tiny models, token batches, the unsliced reference, gloo process groups."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimpipe.config import ModelConfig
from slimpipe.runtime import build_reference, reference_loss

# h 32, 4 query heads over 2 K/V heads (GQA), byte-free vocab 64: seconds for the whole grid on one core.
TINY = ModelConfig(name="test", num_layers=2, hidden=32, ffn=64, num_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=64)
SEQ = 32
# float64 sliced vs unsliced differ only by summation order (~1e-15 relative); 1e-10 leaves a wide margin
# while any missing dK/dV term or mis-normalised loss shows up at ≥ 1e-3.
RTOL = 1e-10


def model(layers: int, **kw: object) -> ModelConfig:
    return TINY.replace(num_layers=layers, **kw)


def tokens(rows: int, seq: int = SEQ, *, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))


def reference_grads(cfg: ModelConfig, toks: torch.Tensor, *,
                    seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and every gradient of the unsliced, unpipelined model on the whole global batch (float64)."""
    ref = build_reference(cfg, seed=seed, dtype=torch.float64)
    loss = reference_loss(ref, toks)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in ref.named_parameters()}


def max_rel_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over parameters of max|g − g_ref| / max|g_ref|, and the worst parameter's name."""
    worst, name = 0.0, ""
    for n, g in grads.items():
        r = ref[n]
        err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-300))
        if err > worst:
            worst, name = err, n
    return worst, name


def _child(rank: int, world: int, store: str, timeout_s: float, out_dir: str, fn: Callable,
           args: tuple) -> None:
    torch.set_num_threads(1)  # first: libgomp after fork hangs with more than one thread
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_dist(fn: Callable, world: int, *args: object, timeout_s: float = 60.0) -> list[object]:
    """Run fn(rank, world, *args) on ``world`` forked gloo processes; return each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        # fork: ~0.1 s per group (platform §6). Where CUDA exists the parent's autograd engine may already
        # run device threads, and a forked child then refuses to run backward: spawn there instead.
        method = "spawn" if torch.cuda.is_available() else "fork"
        # A process group left in a garbage cycle by an earlier in-process run must die here, where its
        # worker threads exist: a forked child's GC would run its destructor and wait forever on threads
        # fork did not copy. Freezing keeps the children's GC off everything inherited.
        gc.collect()
        gc.freeze()
        try:
            mp.start_processes(_child, args=(world, os.path.join(tmp, "store"), timeout_s, tmp, fn, args),
                               nprocs=world, start_method=method, join=True)
        finally:
            gc.unfreeze()
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
