"""Explicit TP+SP autograd functions vs torch's DTensor parallel styles, on the slice executor's K/V store.

Both variants run the same Llama blocks (same initial weights) over the n slices of one sequence on T
forked gloo ranks, each slice's forward through the real K/V store (``KVStore``/``SliceKV``: prefix leaves,
dK/dV hand-down) and the backwards in reverse slice order, exactly as the executor does:

* ``explicit``: ``models/llama_parallel.py`` (column-parallel entry saving the token shard and gathering
  again in backward, row-parallel exit with reduce-scatter, Megatron's layout);
* ``dtensor``: ``torch.distributed.tensor.parallel.parallelize_module`` with torchtitan's Llama plan
  (SequenceParallel norms, PrepareModuleInput all-gather, ColwiseParallel wq/wk/wv/w1/w3, RowwiseParallel
  wo/w2 with Shard(1) output), composite RMSNorm (DTensor runs it op by op).

Reported per variant: per-slice forward+backward time (median over repeats, slowest rank), saved bytes per
token per layer (storages saved for backward, DTensor saves counted by their local tensors), gradient error
against T = 1 (the same blocks in one process). One thread per rank.

    flock /work/measure.lock python bench/tp_styles_bench.py [--tp 2] [--hidden 512] [--slice 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slimpipe.config import ModelConfig
from slimpipe.models.base import init_parameters
from slimpipe.models.llama import Block, LlamaParts
from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.forked import run_forked
from slimpipe.runtime.kv import KVStore
from slimpipe.runtime.stage import RankModel, StageInfo, build_rank_model
from slimpipe.runtime.tensor_parallel import TensorParallel

__all__ = ["main"]


class _CompositeRMSNorm(nn.Module):
    """The textbook RMSNorm (op by op), which DTensor's SequenceParallel can shard."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.detach().clone()), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _saved_bytes(fn):
    """Run fn() counting the distinct storages autograd saves (parameters excluded); (result, bytes)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if isinstance(t, DTensor) else t
        if not isinstance(local, nn.Parameter) and not getattr(t, "_is_param", False):
            st = local.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def _dtensor_model(model: RankModel, cfg: ModelConfig, tp: TensorParallel, mesh) -> RankModel:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
    )

    for block in model.layers.values():
        block.attn_norm = _CompositeRMSNorm(block.attn_norm.weight, cfg.norm_eps)
        block.mlp_norm = _CompositeRMSNorm(block.mlp_norm.weight, cfg.norm_eps)
        block.attn.heads //= tp.size
        block.attn.kv_heads //= tp.size
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                       use_local_output=False),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=False),
            "mlp.w1": ColwiseParallel(), "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
            "mlp.w3": ColwiseParallel(),
        }
        parallelize_module(block, mesh, plan)
    return model


def _build(variant: str, cfg: ModelConfig, layers: int, tp: TensorParallel, mesh) -> RankModel:
    stage = StageInfo(stage=1, layers=tuple(range(layers)), first=False, last=False)
    if variant == "explicit":
        return build_rank_model(LlamaParts(cfg), [stage], seed=0, device=torch.device("cpu"),
                                dtype=torch.float32, tp=tp)
    model = build_rank_model(LlamaParts(cfg), [stage], seed=0, device=torch.device("cpu"),
                             dtype=torch.float32)
    return model if variant == "t1" else _dtensor_model(model, cfg, tp, mesh)


def _run_slices(model: RankModel, layers: int, xs: list[torch.Tensor], douts: list[torch.Tensor],
                seq: int) -> tuple[list[float], int, list[torch.Tensor]]:
    """Forward slices 0..n−1 through the K/V store, backward n−1..0; (per-slice F+B seconds, saved bytes
    of all slices, input gradients)."""
    n = len(xs)
    bounds = [seq * j // n for j in range(n + 1)]
    store = KVStore(bounds, MaskCache("auto"))
    outs, leaves, secs, saved = [], [], [0.0] * n, {}
    for j in range(n):
        t0 = time.perf_counter()
        leaf = xs[j].clone().requires_grad_()
        slice_kv = store.begin_forward(1, 0, j)

        def fwd(leaf=leaf, slice_kv=slice_kv):
            x = leaf
            for i in range(layers):
                x = model.layers[str(i)](x, slice_kv.layer(i))
            return x

        out, seen = _saved_bytes(fwd)
        saved.update(seen)
        outs.append(out)
        leaves.append(leaf)
        secs[j] += time.perf_counter() - t0
    grads = [None] * n
    for j in reversed(range(n)):
        t0 = time.perf_counter()
        store.begin_backward(1, 0, j)
        out = outs[j]
        if hasattr(out, "to_local"):  # a DTensor output stays sharded on tokens: its local part
            out = out.to_local()
        torch.autograd.backward(out, douts[j])
        store.end_backward(1, 0, j)
        grads[j] = leaves[j].grad
        secs[j] += time.perf_counter() - t0
    store.check_drained()
    param_ptrs = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
                  for p in model.parameters()}
    return secs, sum(b for ptr, b in saved.items() if ptr not in param_ptrs), grads


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed as dist

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    tp = TensorParallel(group=mesh.get_group("tp"), size=world, rank=rank)
    cfg = _config(args)
    g = torch.Generator().manual_seed(1)
    full_x = [torch.randn(1, args.slice, cfg.hidden, generator=g) for _ in range(args.slices)]
    full_d = [torch.randn(1, args.slice, cfg.hidden, generator=g) for _ in range(args.slices)]
    tl = args.slice // world
    xs = [x[:, rank * tl:(rank + 1) * tl].contiguous() for x in full_x]
    ds = [d[:, rank * tl:(rank + 1) * tl].contiguous() for d in full_d]
    out = {}
    for variant in args.variants:
        model = _build(variant, cfg, args.layers, tp, mesh)
        times, saved, grads = [], 0, None
        for rep in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            dist.barrier()
            secs, saved, grads = _run_slices(model, args.layers, xs, ds, args.slice * args.slices)
            if rep:  # the first run warms up
                times.append(sum(secs) / args.slices)
        wq = model.layers["0"].attn.wq.weight.grad
        wq = wq.to_local() if hasattr(wq, "to_local") else wq
        norm = model.layers["0"].attn_norm.weight.grad
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if variant == "explicit":
            buf = norm.clone()
            dist.all_reduce(buf, group=tp.group)  # what PipelineRuntime does for replicated weights
            norm = buf
        out[variant] = {"slice_s": statistics.median(times), "saved": saved,
                        "dx": torch.cat(grads, 1), "dwq": wq.clone(), "dnorm": norm.clone()}
    return out


def _config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(name="bench", num_layers=args.layers, hidden=args.hidden, ffn=3 * args.hidden,
                       num_heads=args.hidden // 64, num_kv_heads=args.hidden // 128, head_dim=64,
                       vocab_size=256)


def _reference(args: argparse.Namespace) -> dict:
    """T = 1 in this process (one thread): per-slice time, saved bytes and the gradients."""
    torch.set_num_threads(1)
    cfg = _config(args)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, args.slice, cfg.hidden, generator=g) for _ in range(args.slices)]
    ds = [torch.randn(1, args.slice, cfg.hidden, generator=g) for _ in range(args.slices)]
    model = _build("t1", cfg, args.layers, TensorParallel(group=None, size=1, rank=0), None)
    times = []
    for rep in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        secs, saved, grads = _run_slices(model, args.layers, xs, ds, args.slice * args.slices)
        if rep:
            times.append(sum(secs) / args.slices)
    return {"slice_s": statistics.median(times), "saved": saved, "grads": grads,
            "dwq": model.layers["0"].attn.wq.weight.grad, "dnorm": model.layers["0"].attn_norm.weight.grad}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--slice", type=int, default=512, help="tokens per slice")
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="explicit,dtensor")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    ref = _reference(args)
    res = run_forked(_worker, args.tp, args, timeout_s=900.0)
    tokens_layers = args.slice * args.slices * args.layers
    print(f"T={args.tp} h={args.hidden} L={args.layers} slice={args.slice} n={args.slices} fp32, gloo, "
          f"1 thread per rank; median of {args.repeats}")
    print("| variant | per-slice F+B ms (slowest rank) | ÷ T=1 | saved B/token/layer per rank | ÷ T=1 "
          "| max rel. err dx, dwq, dnorm vs T=1 |")
    print("|---|---|---|---|---|---|")
    t1 = ref["slice_s"]
    s1 = ref["saved"] / tokens_layers
    print(f"| T=1 (one process) | {t1 * 1e3:.1f} | 1 | {s1:.0f} | 1 | |")
    tl = args.slice // args.tp
    for v in args.variants:
        slowest = max(r[v]["slice_s"] for r in res)
        saved = max(r[v]["saved"] for r in res) / tokens_layers
        errs = []
        for r_i, r in enumerate(res):
            dx_ref = torch.cat([g[:, r_i * tl:(r_i + 1) * tl] for g in ref["grads"]], 1)
            rows = ref["dwq"].size(0) // args.tp
            errs.append(max(_rel(r[v]["dx"], dx_ref), _rel(r[v]["dwq"], ref["dwq"][r_i * rows:(r_i + 1) * rows]),
                            _rel(r[v]["dnorm"], ref["dnorm"])))
        print(f"| {v} | {slowest * 1e3:.1f} | {slowest / t1:.2f} | {saved:.0f} | {saved / s1:.3f} | "
              f"{max(errs):.1e} |")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


if __name__ == "__main__":
    main()
