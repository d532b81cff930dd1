"""`slimpipe export`: a `slimpipe train` checkpoint (any layout) → a Hugging Face Llama directory."""

from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "run"]

HELP = "export a training checkpoint to a Hugging Face Llama directory (config.json + safetensors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint root (its 'latest') or a step_N directory of `slimpipe train`")
    parser.add_argument("--out", required=True, metavar="HF_DIR", help="new directory to write (never overwritten)")
    parser.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                        help="dtype of the written weights [keep: as trained]")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors file in GiB [2]")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimpipe.config import ConfigError
    from slimpipe.train.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(args.checkpoint, args.checkpoint, flag="--checkpoint")
    if Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists: give a new directory (export never overwrites)")
    if not args.shard_gb > 0:
        raise ConfigError(f"--shard-gb={args.shard_gb} must be > 0")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ConfigError("export writes safetensors: pip install 'slimpipe[hf]'") from None
    from slimpipe.hf.export import export_checkpoint

    st = export_checkpoint(step_dir, Path(args.out), dtype=args.dtype, shard_bytes=int(args.shard_gb * (1 << 30)))
    print(f"slimpipe export: {step_dir} → {args.out}: {st.tensors} tensors, {st.bytes_written / 2**20:.1f} MiB "
          f"in {st.files} file(s), {st.seconds:.2f} s")
    return 0
