"""Per-rank expert parameter bytes and saved activations of real MoE runs (gloo, CPU) against the memory model.

One forward+backward of SlimPipe on t·p·d forked processes for each layout (tensor-, pipeline- and
expert-parallel sizes), the same global batch each time. Per rank: the bytes of the expert weights it holds, against
``slimpipe.sim.memory.params_on_gpu`` (in the run's dtype); the peak saved-for-backward bytes of its stage
(storage-deduplicated, parameters excluded), against the memory model's activation term, both as bytes per
token per layer at the peak in-flight count. Reproduce the BENCHMARKS.md table with::

    python bench/moe_memory_bench.py    # tiny-moe on 4 ranks: t1 p2 e1, t1 p2 e2, t2 p2 e1, t2 p1 d2 e2; s=512

The model's a is in bf16 bytes; it is shown in the run's dtype and without K/V, which the runtime keeps in
its K/V store (counted apart from the saved tensors).
"""

from __future__ import annotations

import argparse
import sys

import torch

from slimpipe.config import ParallelConfig, load_model
from slimpipe.models.moe import is_expert_parameter
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload
from slimpipe.sim.memory import activation_bytes_per_token, params_on_gpu, peak_inflight

MIB = float(1 << 20)


def _layouts(text: list[str]) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.split(",")) for item in text]  # type: ignore[misc]


def _worker(rank: int, world: int, args: argparse.Namespace) -> list[tuple]:
    torch.set_num_threads(1)
    cfg = load_model(args.model)
    out = []
    for t, p, e in _layouts(args.layouts):
        dp = world // (t * p)
        state = ParallelState.create(pp=p, tp=t, dp=dp, ep=e, timeout_s=600.0)
        sched = build("slimpipe", p=p, m=args.microbatches, n=args.slices)
        rt = PipelineRuntime(cfg, sched, state, dtype=getattr(torch, args.dtype), seed=0)
        m = args.microbatches
        toks = torch.randint(0, cfg.vocab_size, (m * dp, args.seq + 1), generator=torch.Generator().manual_seed(0))
        res = rt.forward_backward(toks[state.dp_rank * m : (state.dp_rank + 1) * m])
        expert = sum(p.numel() * p.element_size() for n, p in rt.named_parameters() if is_expert_parameter(n))
        out.append(((t, p, e), (state.pp_rank, state.dp_rank, state.tp_rank, state.ep_rank), expert,
                    res.peak_saved_bytes[state.pp_rank]))
    return out


def _model(args: argparse.Namespace, layout: tuple[int, int, int], rank: int,
           itemsize: int) -> tuple[float, float, float]:
    """(expert bytes, a without K/V in the run's dtype per token per layer, peak in-flight units) of the
    memory model: the runtime counts K/V in its own buffers, not among the saved tensors."""
    cfg = load_model(args.model)
    t, p, e = layout
    dp = args.world // (t * p)
    par = ParallelConfig(tp=t, pp=p, dp=dp, ep=e, slices=args.slices)
    wl = Workload(model=cfg, parallel=par, seq_len=args.seq, global_batch=args.microbatches * dp)
    a, _ = activation_bytes_per_token(wl)
    a -= 4 * cfg.kv_dim  # K and V (bf16) live in the K/V store
    inflight = peak_inflight(build("slimpipe", p=p, m=args.microbatches, n=args.slices))[rank]
    return params_on_gpu(wl, rank)[1] * itemsize, a * itemsize / 2, inflight


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--world", type=int, default=4, help="processes: t·p·d")
    ap.add_argument("--layouts", nargs="+", default=["1,2,1", "1,2,2", "2,2,1", "2,1,2"], metavar="T,P,E",
                    help="tensor-, pipeline- and expert-parallel sizes per run (d = world / (t·p))")
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    rows = sorted(r for per_rank in run_forked(_worker, args.world, args) for r in per_rank)
    cfg = load_model(args.model)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(f"{args.model}, m={args.microbatches}, s={args.seq}, n={args.slices}, {args.dtype}\n")
    print("| t p d e | rank (pp, dp, tp, ep) | expert params MiB measured | model | saved MiB (peak) | "
          "B/token/layer measured | model a − K/V (run dtype) |\n|---|---|---|---|---|---|---|")
    for layout, (r, d, i, er), expert, saved in rows:
        t, p, e = layout
        want, a, inflight = _model(args, layout, r, itemsize)
        tokens = inflight * args.seq / args.slices / t * cfg.num_layers / p  # per GPU: SP shards over t
        print(f"| {t} {p} {args.world // (t * p)} {e} | ({r}, {d}, {i}, {er}) | {expert / MIB:.3f} | "
              f"{want / MIB:.3f} | {saved / MIB:.2f} | {saved / tokens:.0f} | {a:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
