"""Per-rank parameters and saved activations at t = 1, 2, 4 against the memory model (sim/memory.py).

One bf16 training step of the same model and schedule at every t (forked gloo ranks, one thread each);
per pipeline rank, TP rank 0 (every TP rank holds the same amounts):

* parameters: ``numel`` of the rank's parameters vs ``params_per_gpu`` (the model divides the norm
  weights by t too; the runtime replicates them, 2h per layer: < 0.1 % here);
* activations: the runtime's peak of saved-for-backward bytes + K/V buffers (``peak_activation_bytes``)
  vs the model's ``activations`` (a·s/(t·c)·l per in-flight unit, a = 12h + 4·d_kv + 6f bytes per token and
  layer in bf16, K/V included). 1F1B (n = 1), so one unit's K/V buffer is exactly the micro-batch's: every
  term maps one to one. The last rank also keeps the output layer's tensors for backward — final-norm input
  and output (bf16, 2·2h) and the fp32 softmax (4V) per token, all /t — which the published model counts
  (as fp32 logits, ``output``) only for n > 1; the last column adds them to the model on that rank.

    flock /work/measure.lock python bench/tp_memory_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from slimpipe.config import ModelConfig, ParallelConfig
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build
from slimpipe.sim.memory import memory_model, params_per_gpu
from slimpipe.sim.workload import Workload

__all__ = ["main"]

MODEL = ModelConfig(name="tp-mem", num_layers=6, hidden=256, ffn=768, num_heads=8, num_kv_heads=4, head_dim=32,
                    vocab_size=512)


def _worker(rank: int, world: int, tp: int, pp: int, seq: int, m: int) -> tuple:
    from slimpipe.runtime import ParallelState, PipelineRuntime

    state = ParallelState.create(pp=pp, tp=tp, timeout_s=600.0)
    rt = PipelineRuntime(MODEL, build("1f1b", p=pp, m=m), state, dtype=torch.bfloat16, seed=0)
    toks = torch.randint(0, MODEL.vocab_size, (m, seq + 1), generator=torch.Generator().manual_seed(0))
    res = rt.forward_backward(toks)
    params = sum(p.numel() for p in rt.model.parameters())
    return (state.pp_rank, state.tp_rank, params, res.peak_activation_bytes[state.pp_rank],
            res.peak_saved_bytes[state.pp_rank], res.peak_kv_bytes[state.pp_rank])


def measure(tp: int, pp: int, seq: int, m: int) -> list[dict]:
    rows = run_forked(_worker, tp * pp, tp, pp, seq, m, timeout_s=900.0)
    wl = Workload(model=MODEL, parallel=ParallelConfig(tp=tp, pp=pp), seq_len=seq, global_batch=m)
    mem = memory_model(wl, build("1f1b", p=pp, m=m))
    out = []
    head = seq * (4 * MODEL.hidden + 4 * MODEL.vocab_size) / tp  # one in-flight unit on the last rank (1F1B)
    for pp_rank, tp_rank, params, act, saved, kv in sorted(rows):
        if tp_rank:
            continue
        out.append({"t": tp, "rank": pp_rank, "params": params, "params_model": params_per_gpu(wl, pp_rank),
                    "act": act, "saved": saved, "kv": kv, "act_model": mem[pp_rank].activations,
                    "head_bytes": head if pp_rank == pp - 1 else 0.0})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    rows = [r for t in (1, 2, 4) for r in measure(t, args.pp, args.seq, args.microbatches)]
    base = {r["rank"]: r for r in rows if r["t"] == 1}
    print(f"model {MODEL.name}: L={MODEL.num_layers} h={MODEL.hidden} f={MODEL.ffn} heads "
          f"{MODEL.num_heads}/{MODEL.num_kv_heads} V={MODEL.vocab_size}; 1f1b p={args.pp} m={args.microbatches} "
          f"s={args.seq}, bf16")
    print("| t | pp rank | params | ÷ model | act. MiB (saved + K/V) | ÷ model | ÷ (model + output layer) "
          "| ÷ t=1 (ideal 1/t) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        with_head = r["act"] / (r["act_model"] + r["head_bytes"])
        print(f"| {r['t']} | {r['rank']} | {r['params']:,} | {r['params'] / r['params_model']:.4f} | "
              f"{r['act'] / 2**20:.2f} ({r['saved'] / 2**20:.2f} + {r['kv'] / 2**20:.2f}) | "
              f"{r['act'] / r['act_model']:.4f} | {with_head:.4f} | {r['act'] / base[r['rank']]['act']:.4f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
