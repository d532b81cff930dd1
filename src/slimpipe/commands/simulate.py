"""`slimpipe simulate`: predict step time, bubble, tokens/s, MFU and per-GPU memory of one configuration."""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["HELP", "add_arguments", "run", "add_workload_arguments", "evaluate_from_args"]

HELP = "simulate one training step of a model/layout/schedule: time, bubble, MFU and per-GPU memory"

# Single-field model overrides: flag -> ModelConfig field.
_MODEL_FIELDS = {
    "num-layers": "num_layers", "hidden": "hidden", "ffn": "ffn", "num-heads": "num_heads",
    "num-kv-heads": "num_kv_heads", "head-dim": "head_dim", "vocab-size": "vocab_size",
    "num-experts": "num_experts", "top-k": "top_k",
}


def _recompute_mode(text: str) -> str:
    return "none" if text == "no" else text  # the authors' tables write "no"


def _model_alias(name: str) -> str:
    """Accept the paper's table names too: 'LLaMA-70B-GQA' → 'llama-70b'."""
    from slimpipe.config import MODEL_PRESETS

    key = name.lower().removesuffix("-gqa")
    return key if key in MODEL_PRESETS else name


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `simulate` and `plot`."""
    from slimpipe.schedule.builders import BUILDERS, WARMUPS
    from slimpipe.sim.evaluate import COSTS, SLICE_SPLITS
    from slimpipe.sim.workload import RECOMPUTE_MODES

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="llama-70b", help="preset or ModelConfig .json (default llama-70b)")
    for flag, field in _MODEL_FIELDS.items():
        g.add_argument(f"--{flag}", dest=f"model_{field}", type=int, metavar="N", help=f"override {field}")
    g = parser.add_argument_group("step")
    g.add_argument("--seq-len", type=int, required=True, help="s: tokens per sequence")
    g.add_argument("--global-batch", type=int, required=True, help="B: sequences per step")
    g.add_argument("--micro-batch", type=int, default=1, help="b: sequences per micro-batch (default 1)")
    g.add_argument("--recompute", default="none", type=_recompute_mode, choices=RECOMPUTE_MODES,
                   help="activation recomputation (default none; 'no' is accepted for none)")
    g.add_argument("--offload", type=float, default=0.0, help="α: fraction of activations offloaded to host")
    g.add_argument("--vocab-parallel", action=argparse.BooleanOptionalAction, default=False,
                   help="shard embedding/output over t·p (SlimPipe §9); default: on the end stages")
    g.add_argument("--doc-lengths", default=None, metavar="SPEC",
                   help="packed documents of these lengths (N[:W],… or @FILE or stdlib): attention priced "
                        "document-causal (docs/simulate.md)")
    g = parser.add_argument_group("layout")
    for flag, help_ in (("tp", "t: tensor parallel (with SP)"), ("cp", "c: context parallel"),
                        ("pp", "p: pipeline parallel"), ("ep", "e: expert parallel"),
                        ("dp", "d: data parallel"), ("slices", "n: slices per sequence"),
                        ("vpp", "v: virtual stages per rank")):
        g.add_argument(f"--{flag}", type=int, default=1, help=help_ + " (default 1)")
    g.add_argument("--etp", type=int, default=None, metavar="N",
                   help="expert tensor-parallel size: t (default, experts sharded like the dense MLP) or 1")
    g.add_argument("--gpus", type=int, help="expected GPU count; must equal t·c·p·d")
    g = parser.add_argument_group("schedule and cost")
    g.add_argument("--schedule", default="slimpipe", choices=sorted(BUILDERS),
                   help="builder (default slimpipe)")
    g.add_argument("--warmup", default="auto", choices=WARMUPS,
                   help="auto: single for unsliced non-interleaved (1F1B), the authors' double otherwise; seq1f1b single")
    g.add_argument("--slice-split", default="auto", choices=SLICE_SPLITS,
                   help="equal token counts or equal-FLOP slices (long early, short late: each slice's "
                        "prefix-aware work total/n); auto: equal-flop for seq1f1b, equal otherwise")
    g.add_argument("--equal-slices", action="store_true", help="same as --slice-split equal")
    g.add_argument("--gpu", default="h800", help="hardware preset (h100, h800, h200, a100) or .json")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="measured profile from `slimpipe calibrate` (replaces --gpu)")
    g.add_argument("--cost", default="analytic", choices=COSTS,
                   help="analytic (FLOPs/bandwidth) or uniform (F=1, B=2, free communication)")
    g.add_argument("--attn-balance", type=int, default=0, metavar="N",
                   help="attention context exchange: at most N prefix slices per exchange (0 = off; "
                        "docs/exchange.md)")
    g.add_argument("--max-actions", type=int, default=None, metavar="N",
                   help="refuse schedules of more than N estimated actions (default 2,000,000, a few seconds; 0 = no "
                        "limit)")


def evaluate_from_args(args: argparse.Namespace):  # -> slimpipe.sim.evaluate.Evaluation
    """Parse the shared flags into a Workload, check them, and simulate."""
    from slimpipe.config import ConfigError, ParallelConfig, load_model
    from slimpipe.rules import check_exchange, check_size
    from slimpipe.sim.documents import parse_doc_lengths
    from slimpipe.sim.evaluate import evaluate
    from slimpipe.sim.hardware import load_hardware, load_profile
    from slimpipe.sim.workload import Workload

    overrides = {field: getattr(args, f"model_{field}") for field in _MODEL_FIELDS.values()}
    model = load_model(_model_alias(args.model), **overrides)
    par = ParallelConfig(tp=args.tp, cp=args.cp, pp=args.pp, dp=args.dp, ep=args.ep, etp=args.etp,
                         vpp=args.vpp, slices=args.slices, micro_batch=args.micro_batch)
    if args.gpus is not None and args.gpus != par.gpus:
        raise ConfigError(
            f"--gpus={args.gpus} does not match t·c·p·d = {args.tp}·{args.cp}·{args.pp}·{args.dp} = "
            f"{par.gpus}:"
            f" change --dp (or --tp/--cp/--pp) so the product is {args.gpus}"
        )
    docs = parse_doc_lengths(args.doc_lengths) if getattr(args, "doc_lengths", None) else None
    wl = Workload(model=model, parallel=par, seq_len=args.seq_len, global_batch=args.global_batch,
                  recompute=args.recompute, offload=args.offload, vocab_parallel=args.vocab_parallel,
                  documents=docs)
    if docs is not None and args.attn_balance:
        raise ConfigError("--doc-lengths prices packed documents, which run without the attention exchange: "
                          "drop --attn-balance")
    check_exchange(args.schedule, par.pp, par.slices, args.attn_balance)
    check_size(par.pp, wl.microbatches, par.slices, par.vpp, limit=args.max_actions)
    hardware = load_profile(args.profile) if args.profile else load_hardware(args.gpu)
    return evaluate(wl, args.schedule, hardware=hardware, cost=args.cost, warmup=args.warmup,
                    equal_slices=args.equal_slices, attn_balance=args.attn_balance,
                    slice_split=args.slice_split)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ev = evaluate_from_args(args)
    elapsed = time.perf_counter() - t0
    if args.json:
        out = {"config": _config_dict(args, ev), **ev.report.to_dict(), "sim_wall_s": elapsed}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(_table(args, ev, elapsed))
    return 0


def _etp(wl) -> str:
    """`` etp1`` when the expert tensor-parallel size differs from t (MoE only)."""
    par = wl.parallel
    return f" etp{par.expert_tp}" if wl.model.num_experts > 1 and par.expert_tp != par.tp else ""


def _config_dict(args: argparse.Namespace, ev) -> dict[str, object]:
    wl, sched = ev.workload, ev.schedule
    return {
        "model": wl.model.name, "seq_len": wl.seq_len, "global_batch": wl.global_batch,
        "microbatches": wl.microbatches, "tp": args.tp, "cp": args.cp, "pp": args.pp, "dp": args.dp,
        "ep": args.ep, "etp": wl.parallel.expert_tp, "slices": args.slices, "vpp": args.vpp, "layers_per_stage": wl.layers_per_stage,
        "schedule": sched.name, "warmup_w": sched.meta.w, "group_g": sched.meta.g,
        "slice_split": "equal" if sched.slice_weights is None else "equal-flop",
        "slice_weights": sched.slice_weights, "recompute": wl.recompute, "offload": wl.offload,
        "vocab_parallel": wl.vocab_parallel, "cost": ev.cost.name, "gpu": _hardware_label(args),
        "attn_balance": args.attn_balance, **_exchange(args, ev), **_documents(ev),
    }


def _exchange(args: argparse.Namespace, ev) -> dict[str, object]:
    """Attention-exchange figures (sim/exchange.py) when --attn-balance is on."""
    if not args.attn_balance:
        return {}
    from slimpipe.sim.exchange import exchange_summary

    return exchange_summary(ev.schedule, ev.cost)


def _documents(ev) -> dict[str, object]:
    """Packed-document figures (--doc-lengths): per-slice attention pairs against the causal sequence's."""
    wl = ev.workload
    if wl.documents is None or not hasattr(ev.cost, "pairs"):
        return {}
    from slimpipe.sim.documents import slice_pairs

    causal = slice_pairs(wl.seq_len, ev.schedule.slice_fractions(), None)
    doc = ev.cost.pairs
    return {"doc_lengths": wl.documents.name, "doc_mean_length": wl.documents.mean,
            "attention_pairs_per_slice": [p + d for p, d in doc],
            "causal_pairs_per_slice": [p + d for p, d in causal],
            "attention_work_ratio": sum(p + d for p, d in doc) / sum(p + d for p, d in causal)}


def _hardware_label(args: argparse.Namespace) -> str:
    profile = getattr(args, "profile", None)
    return f"profile {profile}" if profile else args.gpu


def _table(args: argparse.Namespace, ev, elapsed: float) -> str:
    wl, rep, sched = ev.workload, ev.report, ev.schedule
    par = wl.parallel
    unit = "s" if ev.cost.name == "analytic" else " units (F=1, B=2)"
    lines = [
        f"{wl.model.name}  s={wl.seq_len}  B={wl.global_batch} (m={wl.microbatches})  "
        f"t{par.tp} c{par.cp} p{par.pp} d{par.dp} e{par.ep}{_etp(wl)}  "
        f"n{par.slices} v{par.vpp} (l={wl.layers_per_stage})  "
        f"{rep.gpus} GPUs",
        f"schedule {sched.name} (w={sched.meta.w}, g={sched.meta.g}"
        + (", equal-flop slices" if sched.slice_weights is not None else "") + ")  "
        f"recompute {wl.recompute}  "
        f"offload {wl.offload}  vocab-parallel {'on' if wl.vocab_parallel else 'off'}  "
        f"attn-balance {args.attn_balance or 'off'}  cost {ev.cost.name}"
        + (f" on {_hardware_label(args)}" if ev.cost.name == "analytic" else ""),
        "",
        f"step time     {rep.step_time_s:.6g}{unit}  "
        f"(pipeline {rep.pipeline_time_s:.6g}, dp sync {rep.dp_sync_s:.3g})",
        f"bubble        {100 * rep.bubble_ratio:.2f} %",
        f"tokens/s      {rep.tokens_per_s:.6g}  ({rep.tokens_per_s / rep.gpus:.6g} per GPU)",
    ]
    if rep.mfu is not None:
        as_run = ("6N+12·L·H·Q·K, K = keys per query, document-causal attention as run"
                  if wl.documents is not None else "6N+6·L·H·Q·T, causal attention as run")
        lines.append(f"MFU           {100 * rep.mfu:.1f} % executed ({as_run})   "
                     f"{100 * rep.mfu_dense:.1f} % dense convention (6N+12·L·H·Q·T)")
    docs = _documents(ev)
    if docs:
        lines.append(f"documents     {docs['doc_lengths']} (mean {docs['doc_mean_length']:.0f} tokens): attention "
                     f"work {100 * docs['attention_work_ratio']:.1f} % of causal; per slice "
                     + " ".join(f"{a / c:.2f}" for a, c in zip(docs["attention_pairs_per_slice"],
                                                              docs["causal_pairs_per_slice"])))
    x = _exchange(args, ev)
    if x:
        lines.append(f"exchange      {x['exchanges_f']} F + {x['exchanges_b']} B pairs, attention moved "
                     f"{x['moved_attention_s']:.4g} s, {x['exchange_bytes'] / 2**30:.3g} GiB/GPU of a stage; "
                     "concurrent attention max/min F {:.2f}→{:.2f}, B {:.2f}→{:.2f}".format(
                         *x["attn_ratio_f"], *x["attn_ratio_b"]))
    cols = ("peak", "params_grads", "optimizer", "activations", "output", "recomputed", "kv_cache", "kv_grad",
            "offloaded") + (("exchange",) if args.attn_balance else ())
    heads = ("peak", "param+grad", "optimizer", "activation", "output", "recomputed", "kv_cache", "kv_grad",
             "offloaded") + (("exchange",) if args.attn_balance else ())
    lines += ["", "memory per GPU (GiB)   * = highest peak",
              "rank " + " ".join(f"{h:>10}" for h in heads) + "  in-flight"]
    top = rep.peak_rank
    for mb in rep.memory:
        g = mb.gib()
        mark = "*" if mb.rank == top else " "
        lines.append(f"{mb.rank:>3}{mark} " + " ".join(f"{g[c]:>10.2f}" for c in cols)
                     + f"  {mb.peak_inflight:>9.4g}")
    if rep.hbm_bytes is not None and rep.memory[top].peak > rep.hbm_bytes:
        lines.append(f"warning: peak {rep.memory[top].peak / 2**30:.1f} GiB exceeds "
                     f"{_hardware_label(args)}'s "
                     f"{rep.hbm_bytes / 2**30:.1f} GiB")
    lines.append(f"\n(simulated in {elapsed:.2f} s)")
    return "\n".join(lines) + "\n"
