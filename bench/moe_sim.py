"""Simulated Mixtral per-GPU memory and MFU with experts sharded over expert-TP (the fix) and without.

Megatron shards expert weights over its expert tensor-parallel size, which defaults to t; the memory model
before issue #12 kept whole experts on every GPU of a TP group (expert-TP = 1, ``--etp 1`` now), which
overstates param+grad about t-fold at e = 1. This prints both side by side for the paper's setup (128
H800s, 4 Mi tokens per step, partial+fc1, vocabulary in PP, SlimPipe interleaved with v = L/p)::

    python bench/moe_sim.py                         # mixtral-8x7b, 64K…512K, two layouts per length
    python bench/moe_sim.py --model mixtral-8x22b

``--etp 1`` reproduces the previous memory model's figures exactly (same formula); step times also moved
with the MoE communication terms added by the fix (docs/simulate.md, "MoE"). ``--previous`` prints the
figures of a simulator from before the fix (no ``etp`` field) when that checkout's ``src`` is first on
PYTHONPATH::

    git worktree add /tmp/prev fd6d78f && PYTHONPATH=/tmp/prev/src python bench/moe_sim.py --previous
"""

from __future__ import annotations

import argparse

from slimpipe.config import ParallelConfig, load_model
from slimpipe.sim.evaluate import evaluate
from slimpipe.sim.hardware import load_hardware
from slimpipe.sim.memory import GIB
from slimpipe.sim.workload import Workload

# (s, B, t, c, p, d, e, n): 128 GPUs, B·s = 4 Mi tokens; an e = 1 layout with t = 8 and an EP layout.
ROWS = (
    (65536, 64, 8, 1, 4, 4, 1, 8), (65536, 64, 4, 1, 4, 8, 8, 8),
    (131072, 32, 8, 1, 4, 4, 1, 8), (131072, 32, 4, 1, 4, 8, 8, 8),
    (262144, 16, 8, 2, 4, 2, 1, 16), (262144, 16, 4, 2, 4, 4, 8, 16),
    (524288, 8, 8, 4, 4, 1, 1, 16), (524288, 8, 4, 4, 4, 2, 8, 16),
)


def _figures(model, row, etp, gpu):
    s, batch, t, c, p, d, e, n = row
    layout = dict(tp=t, cp=c, pp=p, dp=d, ep=e, slices=n, vpp=model.num_layers // p)
    par = ParallelConfig(**layout) if etp == "previous" else ParallelConfig(**layout, etp=etp)
    wl = Workload(model=model, parallel=par, seq_len=s, global_batch=batch, recompute="partial+fc1",
                  vocab_parallel=True)
    rep = evaluate(wl, "slimpipe", hardware=gpu).report
    mem = rep.memory[rep.peak_rank]
    return (mem.params_grads / GIB, mem.optimizer / GIB, mem.activations / GIB, mem.peak / GIB,
            100 * getattr(rep, "mfu_causal", rep.mfu), mem.peak <= gpu.hbm_bytes)  # causal MFU, both eras


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--gpu", default="h800")
    ap.add_argument("--previous", action="store_true", help="a simulator from before the fix is on the path")
    args = ap.parse_args()
    model, gpu = load_model(args.model), load_hardware(args.gpu)
    if args.previous:
        print("| s | layout | param+grad | optimizer | activation | peak | MFU causal % |\n|---|---|---|---|---|---|---|")
    else:
        print("| s | layout | param+grad etp 1 → t | optimizer | activation | peak etp 1 → t | MFU causal % "
              "etp 1 → t | fits 80 GiB (etp t) |\n|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        s, batch, t, c, p, d, e, n = row
        layout = f"{s // 1024}K | t{t} c{c} p{p} d{d} e{e} n{n} v{model.num_layers // p} m{batch // d}"
        if args.previous:
            print(f"| {layout} | " + " | ".join(f"{x:.1f}" for x in _figures(model, row, "previous", gpu)[:5])
                  + " |")
            continue
        (pg1, opt, act, peak1, mfu1, _), (pg, _, _, peak, mfu, fits) = (_figures(model, row, etp, gpu)
                                                                        for etp in (1, None))
        print(f"| {layout} | {pg1:.1f} → **{pg:.1f}** | {opt:.1f} | {act:.1f} | {peak1:.1f} → **{peak:.1f}** | "
              f"{mfu1:.1f} → {mfu:.1f} | {'yes' if fits else '**no**'} |")


if __name__ == "__main__":
    main()
