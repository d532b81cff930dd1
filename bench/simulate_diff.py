"""`slimpipe simulate --json` over a fixed set of configurations, for before/after checks of a refactor.

Every field of the JSON is kept except wall times (``sim_wall_s`` and any other ``*wall*`` key), so two
versions of the code can be compared field by field:

    PYTHONPATH=<old checkout>/src python bench/simulate_diff.py --out before.json
    python bench/simulate_diff.py --out after.json --compare before.json   # exit 1 on any difference

The set covers every builder, p 4–16, n 1–64, v 1–6, seq1f1b's unequal slices, the attention exchange,
the uniform cost, and each of them with and without ``--vocab-parallel`` (the configurations of the
vocabulary and exchange work, BENCHMARKS.md "Simulator speed").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

from slimpipe.cli import main as cli

CONFIGS = {
    "7b-32k-slimpipe-p4-n4": "--model llama-7b --seq-len 32768 --global-batch 4 --pp 4 --slices 4",
    "7b-64k-slimpipe-p8-n8-v2": "--model llama-7b --seq-len 65536 --global-batch 8 --pp 8 --slices 8 --vpp 2",
    "7b-16k-1f1b-p4": "--model llama-7b --seq-len 16384 --global-batch 8 --pp 4 --schedule 1f1b",
    "7b-16k-gpipe-p4": "--model llama-7b --seq-len 16384 --global-batch 4 --pp 4 --schedule gpipe",
    "13b-32k-interleaved-p4-v2": "--model llama-13b --seq-len 32768 --global-batch 8 --pp 4 --vpp 2 "
                                 "--schedule interleaved-1f1b",
    "7b-64k-seq1f1b-p4-n4": "--model llama-7b --seq-len 65536 --global-batch 4 --pp 4 --slices 4 "
                            "--schedule seq1f1b",
    "13b-256k-slimpipe-p8-n16": "--model llama-13b --seq-len 262144 --global-batch 4 --tp 4 --pp 8 --slices 16",
    "7b-128k-exchange-p4-n8": "--model llama-7b --seq-len 131072 --global-batch 4 --tp 2 --pp 4 --slices 8 "
                              "--attn-balance 2",
    "7b-128k-exchange-p8-n16-v2": "--model llama-7b --seq-len 131072 --global-batch 4 --tp 2 --pp 8 "
                                  "--slices 16 --vpp 2 --attn-balance 4",
    "7b-32k-uniform-p4-n8-v2": "--model llama-7b --seq-len 32768 --global-batch 4 --pp 4 --slices 8 --vpp 2 "
                               "--cost uniform",
    "7b-32k-slimpipe-p4-n8-v6": "--model llama-7b --seq-len 32768 --global-batch 4 --pp 4 --slices 8 --vpp 6 "
                                "--num-layers 48",
    "70b-512k-t8c2p8-n32-v2": "--model llama-70b --seq-len 524288 --global-batch 8 --tp 8 --cp 2 --pp 8 "
                              "--slices 32 --vpp 2 --recompute partial+fc1",
    "70b-2048k-headline": "--model llama-70b --seq-len 2097152 --global-batch 8 --tp 4 --cp 4 --pp 16 --dp 1 "
                          "--slices 64 --vpp 5 --recompute partial+fc1 --offload 0.75 --gpus 256",
}


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if "wall" not in k}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def run_all() -> dict[str, object]:
    """Every configuration with and without --vocab-parallel: its JSON (wall times dropped) or its error."""
    out: dict[str, object] = {}
    for label, argv in CONFIGS.items():
        for vp in ("--no-vocab-parallel", "--vocab-parallel"):
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = cli(["simulate", *argv.split(), vp, "--json"])
            key = f"{label} {vp}"
            out[key] = _strip(json.loads(stdout.getvalue())) if code == 0 else {"exit": code,
                                                                                 "stderr": stderr.getvalue()}
    return out


def _diff(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="write the JSON of every configuration here")
    ap.add_argument("--compare", default="", help="an earlier --out file: list every differing field")
    args = ap.parse_args(argv)
    before = None
    if args.compare:
        try:
            with open(args.compare) as fh:
                before = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"error: --compare {args.compare}: {exc}: give a file written by --out", file=sys.stderr)
            return 2
    result = run_all()
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    if before is None:
        print(f"{len(result)} runs written to {args.out}")
        return 0
    diffs = _diff(before, json.loads(json.dumps(result)))
    print(f"{len(result)} runs, {len(diffs)} differing fields" + "".join(f"\n  {d}" for d in diffs[:50]))
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
