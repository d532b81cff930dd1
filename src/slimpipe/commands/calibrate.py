"""`slimpipe calibrate`: measure this machine for the cost model and write a profile JSON.

The profile is a Hardware (measured peak, efficiencies and links) with fitted kernel times attached;
`slimpipe simulate --profile FILE` and `slimpipe plan --profile FILE` use it (docs/calibrate.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["HELP", "add_arguments", "run"]

HELP = "measure kernel times, p2p links and runtime overheads on this machine into a profile JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="what to measure (default cpu)")
    parser.add_argument("--model", default=None,
                        help="preset or ModelConfig .json whose shapes are measured (default: tiny on cpu, "
                             "llama-1b on cuda)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU intra-op threads while measuring (default: torch's); use 1 to match "
                             "single-threaded pipeline ranks")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="cpu: measure in this many single-threaded processes at once, as the ranks of "
                             "a CPU pipeline share the machine (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (~10 s; for tests)")
    parser.add_argument("--links", default="auto",
                        help="cuda: preset whose NVLink/NIC figures the profile keeps (default: from the "
                             "device name)")
    parser.add_argument("-o", "--output", default="profile.json", help="profile path (default profile.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing profile")


def run(args: argparse.Namespace) -> int:
    from slimpipe.config import ConfigError, load_model
    from slimpipe.outputs import check_output_file

    check_output_file(args.output, "-o", overwrite=args.overwrite)  # before minutes of measuring
    from slimpipe.calibrate import CalibrateOptions, calibrate  # imports torch

    if args.threads < 0:
        raise ConfigError(f"--threads={args.threads} must be ≥ 0 (0 keeps torch's default)")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency={args.concurrency} must be ≥ 1")
    model = load_model(args.model or ("tiny" if args.device == "cpu" else "llama-1b"))
    doc = calibrate(CalibrateOptions(device=args.device, model=model, threads=args.threads, quick=args.quick,
                                     links=args.links, concurrency=args.concurrency))
    partial = f"{args.output}.partial"
    with open(partial, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(partial, args.output)  # a reader never sees half a profile
    hw, prof, meta, cons = doc["hardware"], doc["profile"], doc["meta"], doc["consistency"]
    sys.stdout.write(
        f"wrote {args.output} ({meta['device_name']}, {prof['dtype']}, threads {prof['threads']}, "
        f"{meta['concurrency']} concurrent, model "
        f"{prof['model']}) in {meta['elapsed_s']:.1f} s; load {meta['load_before'][0]:.2f}\n"
        f"peak {hw['peak_flops'] / 1e9:.1f} GFLOP/s (best linear layer), gemm efficiency "
        f"{hw['gemm_efficiency']:.2f}, attention efficiency {hw['attention_efficiency']:.2f}\n"
        f"p2p {prof['p2p_latency_s'] * 1e6:.0f} µs + bytes / {prof['p2p_bandwidth'] / 1e9:.2f} GB/s "
        f"({meta['p2p_note'].split(' (')[0]}); rank time per message (2-rank executor): send "
        f"{prof['p2p_send_s'] * 1e3:.2f} ms, late receive {prof['p2p_recv_s'] * 1e3:.2f} ms\n"
        f"runtime: κ fwd {prof['compose_fwd']:.2f} bwd {prof['compose_bwd']:.2f}, per-action overhead "
        f"fwd {prof['action_fwd_s'] * 1e3:.2f} ms bwd {prof['action_bwd_s'] * 1e3:.2f} ms, between actions "
        f"{prof.get('action_gap_s', 0.0) * 1e3:.2f} ms\n"
        f"consistency: predicted/measured over {cons['rows']} runtime times: median "
        f"{cons['median_ratio']:.3f}, "
        f"range {cons['min_ratio']:.3f}–{cons['max_ratio']:.3f}\n"
        + "".join(f"  2-rank step {r['what']}: simulated/measured {r['ratio']:.3f} "
                  f"({r['predicted_s'] * 1e3:.0f} / {r['measured_s'] * 1e3:.0f} ms)\n" for r in cons["steps"])
    )
    return 0
