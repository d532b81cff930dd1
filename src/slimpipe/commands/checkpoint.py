"""`slimpipe checkpoint verify DIR`: check every file of the checkpoints in DIR against the checksums
recorded at save, and name the bad ones. No torch.

Exit code 0 when every checkpoint verifies, 1 when one does not (or cannot: saved before checksums were
recorded, or its ``latest`` pointer is broken), 2 when DIR holds no checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

__all__ = ["HELP", "add_arguments", "run", "verify"]

HELP = "verify checkpoints against the SHA-256 of every file recorded at save (names the bad file)"

_STEP = re.compile(r"step_\d{6,}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("verify", help=HELP, description=HELP)
    p.add_argument("dir", metavar="DIR", help="a checkpoint root (with 'latest') or one step_* directory")


def run(args: argparse.Namespace) -> int:
    lines, ok = verify(Path(args.dir))
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0 if ok else 1


def verify(path: Path) -> tuple[list[str], bool]:
    """(report lines, every checkpoint verified). Raises ConfigError when ``path`` holds no checkpoint."""
    from slimpipe.config import ConfigError
    from slimpipe.train.checkpoint import LATEST, STATE_FILE

    t0 = time.perf_counter()
    if (path / STATE_FILE).is_file() or _STEP.fullmatch(path.name):
        steps, lines, ok = [path], [], True
    elif path.is_dir():
        steps = sorted(p for p in path.iterdir() if p.is_dir() and _STEP.fullmatch(p.name))
        lines, ok = _pointer(path / LATEST, steps)
        torn = sorted(p.name for p in path.glob("step_*.tmp"))
        lines += [f"{name}  torn save (ignored by --resume; the next save removes it)" for name in torn]
    else:
        raise ConfigError(f"{path}: no such directory; give a checkpoint root or a step_* directory")
    if not steps:
        raise ConfigError(f"{path}: no step_* checkpoint in it; give the --checkpoint-dir of a run")
    bad = 0
    for step_dir in steps:
        line, good = _verify_one(step_dir)
        lines.append(line)
        bad += not good
    elapsed = time.perf_counter() - t0
    lines.append(f"{len(steps) - bad} of {len(steps)} checkpoint(s) verified in {elapsed:.2f} s"
                 + ("" if ok and not bad else ": do not resume from the ones marked BAD"))
    return lines, ok and not bad


def _pointer(pointer: Path, steps: list[Path]) -> tuple[list[str], bool]:
    if not pointer.exists():
        return [f"{pointer.name}: none (no save completed, or not a checkpoint root)"], True
    name = pointer.read_bytes()[:256].decode("utf-8", errors="replace").strip()
    if _STEP.fullmatch(name) and any(s.name == name for s in steps):
        return [f"{pointer.name} -> {name}"], True
    return [f"{pointer.name}  BAD  names {name[:40]!r}, not a checkpoint here: --resume with a step_* "
            "directory"], False


def _verify_one(step_dir: Path) -> tuple[str, bool]:
    from slimpipe.config import ConfigError
    from slimpipe.train.manifest import content_problems, read_manifest, size_problems

    try:
        files = read_manifest(step_dir)
    except ConfigError as exc:
        return f"{step_dir.name}  BAD  {exc}", False
    if files is None:
        return (f"{step_dir.name}  UNVERIFIED  no checksums.json (saved before slimpipe recorded "
                "checksums, or not a complete save)"), False
    problems = size_problems(step_dir, files) or content_problems(step_dir, files, sorted(files))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{step_dir.name}  BAD  {problems[0]}{more}", False
    size = sum(int(e["bytes"]) for e in files.values())
    return f"{step_dir.name}  ok  {len(files)} files, {size / 2**20:,.1f} MiB", True
