"""`slimpipe train`: train a Llama on the SlimPipe runtime (flags = slimpipe.train.TrainConfig fields).

No flags: the embedded demo (a ~6M-parameter byte-level Llama on the Python standard library's source,
2 pipeline stages, SlimPipe with 4 slices). Also runs under ``torchrun ... -m slimpipe train``.
"""

from __future__ import annotations

import argparse
import dataclasses

from slimpipe.sim.workload import RECOMPUTE_MODES
from slimpipe.train.config import (
    DATA_DTYPES, DEVICES, DOC_POSITIONS, DTYPES, NONFINITE, TrainConfig, field_docs, load_config_file,
)

__all__ = ["HELP", "add_arguments", "run"]

HELP = "train a model with a pipeline schedule (default: the embedded stdlib demo, 2 stages, SlimPipe)"

_CHOICES = {"dtype": DTYPES, "device": DEVICES, "data_dtype": DATA_DTYPES, "recompute": RECOMPUTE_MODES,
            "nonfinite": NONFINITE, "doc_positions": DOC_POSITIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    docs = field_docs()
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON of the fields below (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS: only flags the user typed reach the config, so a --config file is not overridden by defaults.
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{docs.get(f.name, '')} [{f.default!r}]")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", metavar="PATH", **common)
        else:
            parser.add_argument(flag, type=type(f.default), choices=_CHOICES.get(f.name),
                                metavar=f.name.upper(), **common)


def run(args: argparse.Namespace) -> int:
    from slimpipe.train import train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return train(TrainConfig(**values))
