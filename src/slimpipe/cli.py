"""`slimpipe` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int``. Those modules must not import torch at import time (planning commands stay
instant); they import heavy things inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

# subcommand -> module; order is the order of `slimpipe --help`.
COMMANDS: dict[str, str] = {
    "train": "slimpipe.commands.train",
    "eval": "slimpipe.commands.eval",
    "export": "slimpipe.commands.export",
    "simulate": "slimpipe.commands.simulate",
    "show": "slimpipe.commands.show",
    "plot": "slimpipe.commands.plot",
    "plan": "slimpipe.commands.plan",
    "calibrate": "slimpipe.commands.calibrate",
    "checkpoint": "slimpipe.commands.checkpoint",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"slimpipe {self.prog.split(' ', 1)[-1]}: error: {message}\n")
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimpipe", description="SlimPipe pipeline parallelism: train, simulate, plan.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from slimpipe.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:  # user-facing: one line, exit 2
        sys.stderr.write(f"slimpipe {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
