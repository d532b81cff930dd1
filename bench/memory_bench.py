"""Per-stage activation memory of real multi-process pipeline runs (gloo, CPU) against the memory model.

Runs one forward+backward of every schedule on p forked processes (one per pipeline rank) and prints, per
stage, the peak saved-for-backward bytes (storage-deduplicated, parameters excluded), the peak K/V buffer
+ dK/dV bytes, and stage 0's saved bytes relative to 1F1B next to slimpipe.sim.memory_model's prediction
for the same schedule. Reproduce the BENCHMARKS.md table with::

    python bench/memory_bench.py --seq 1024            # tiny preset, p=4, m=4, n=8, float32

``--local --device cuda`` runs every rank of the pipeline in one process on one GPU instead (the local
runtime: same accounting, plus the process's torch.cuda.max_memory_allocated per schedule).
"""

from __future__ import annotations

import argparse
import sys

import torch

from slimpipe.config import ParallelConfig, load_model
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload, memory_model

MIB = float(1 << 20)


def _rows(args: argparse.Namespace) -> list[tuple[str, str, int, int, str]]:
    """(label, builder, n, v, warm-up) of every measured schedule."""
    n = args.slices
    rows = [
        ("gpipe", "gpipe", 1, 1, "auto"),
        ("1f1b", "1f1b", 1, 1, "auto"),
        ("interleaved-1f1b v=2", "interleaved-1f1b", 1, 2, "auto"),
        (f"seq1f1b k={n}", "seq1f1b", n, 1, "auto"),
        (f"slimpipe n={n} (w=2, default)", "slimpipe", n, 1, "auto"),
        (f"slimpipe n={n} (w=1, --warmup single)", "slimpipe", n, 1, "single"),
        (f"slimpipe n={n} v=2", "slimpipe", n, 2, "auto"),
    ]
    return [r for r in rows if r[1] in args.schedules or r[1] == "1f1b"]


def _measure(rt, toks: torch.Tensor) -> tuple[list[int], list[int], float, int, list[int]]:
    res = rt.forward_backward(toks)
    cuda = max(res.cuda_max_allocated) if res.cuda_max_allocated else 0
    return res.peak_saved_bytes, res.peak_kv_bytes, res.step_time_s, cuda, res.peak_activation_bytes


def _tokens(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (args.microbatches, args.seq + 1), generator=torch.Generator().manual_seed(0))


def _run_local(args: argparse.Namespace) -> dict:
    from slimpipe.runtime import LocalPipelineRuntime

    cfg = load_model(args.model, num_layers=args.layers)
    results = {}
    for label, name, n, v, warmup in _rows(args):
        sched = build(name, p=args.pp, m=args.microbatches, n=n, v=v, warmup=warmup)
        rt = LocalPipelineRuntime(cfg, sched, dtype=getattr(torch, args.dtype), device=args.device)
        results[label] = _measure(rt, _tokens(args, cfg.vocab_size))
        del rt
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    """One gloo rank (slimpipe.runtime.forked: single-threaded, FileStore): every row's measurement."""
    state = ParallelState.create(pp=world, dp=1, timeout_s=600.0)
    cfg = load_model(args.model, num_layers=args.layers)
    results = {}
    for label, name, n, v, warmup in _rows(args):
        sched = build(name, p=world, m=args.microbatches, n=n, v=v, warmup=warmup)
        rt = PipelineRuntime(cfg, sched, state, dtype=getattr(torch, args.dtype))
        results[label] = _measure(rt, _tokens(args, cfg.vocab_size))
    return results


def _predicted(args: argparse.Namespace, name: str, n: int, v: int, warmup: str) -> float:
    cfg = load_model(args.model, num_layers=args.layers)
    work = Workload(model=cfg, parallel=ParallelConfig(pp=args.pp, slices=n, vpp=v), seq_len=args.seq,
                    global_batch=args.microbatches)
    sched = build(name, p=args.pp, m=args.microbatches, n=n, v=v, warmup=warmup)
    return memory_model(work, sched)[0].activations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="preset or JSON (default tiny: 8 layers, h 128)")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "interleaved-1f1b", "seq1f1b", "slimpipe"],
                    help="builders to measure besides 1f1b (the baseline)")
    ap.add_argument("--local", action="store_true", help="all ranks in this process (LocalPipelineRuntime)")
    ap.add_argument("--device", default="cpu", help="with --local: cpu or cuda")
    args = ap.parse_args(argv)
    if args.local:
        if args.device == "cpu":
            torch.set_num_threads(1)  # 2 OpenMP threads on a shared 2-core machine spin-wait (50× slower)
        results = _run_local(args)
    else:
        results = run_forked(_worker, args.pp, args, timeout_s=600.0)[0]
    base_saved, base_total = results["1f1b"][0][0], results["1f1b"][4][0]
    base_pred = _predicted(args, "1f1b", 1, 1, "auto")
    print(f"model {args.model}, p={args.pp}, m={args.microbatches}, s={args.seq}, {args.dtype}; MiB per "
          "stage (saved activations | K/V + dK/dV); stage-0 saved ÷ 1f1b: measured vs "
          "slimpipe.sim.memory_model; total: stage-0 peak of saved + K/V + dK/dV ÷ 1f1b's\n")
    head = " | ".join(f"stage {r}" for r in range(args.pp))
    print(f"| schedule | {head} | ratio measured | ratio sim | total ratio | step s | cuda max GiB |")
    print("|---" * (args.pp + 6) + "|")
    for label, name, n, v, warmup in _rows(args):
        saved, kv, step, cuda, total = results[label]
        cells = " | ".join(f"{s / MIB:.2f} \\| {k / MIB:.2f}" for s, k in zip(saved, kv))
        pred = _predicted(args, name, n, v, warmup) / base_pred
        print(f"| {label} | {cells} | {saved[0] / base_saved:.4f} | {pred:.4f} | {total[0] / base_total:.4f} | "
              f"{step:.2f} | {cuda / 2**30:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
