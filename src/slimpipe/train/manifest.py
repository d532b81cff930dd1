"""Checksums of a checkpoint's files: written at save, checked on resume and by `slimpipe checkpoint verify`.

``checksums.json`` in a step directory lists every file of the save (DCP shards, ``.metadata``,
``trainer_state.json``) with its size and SHA-256. Sizes are checked before any process starts (a
truncated, missing or replaced file costs a stat); contents are hashed by the ranks in parallel, each a
share of the files, at save and again before loading. No torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from slimpipe.config import ConfigError

__all__ = ["MANIFEST", "file_digest", "saved_files", "share", "write_manifest", "read_manifest",
           "size_problems", "content_problems"]

MANIFEST = "checksums.json"
_BLOCK = 1 << 22


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of one file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def saved_files(step_dir: Path) -> list[str]:
    """Names of the regular files a save wrote (everything but the manifest), sorted."""
    return sorted(p.name for p in step_dir.iterdir() if p.is_file() and p.name != MANIFEST)


def share(names: list[str], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` of ``world`` hashes: every world-th name, so ranks split the bytes."""
    return names[rank::world]


def write_manifest(step_dir: Path, digests: dict[str, tuple[int, str]]) -> None:
    files = {n: {"bytes": b, "sha256": h} for n, (b, h) in sorted(digests.items())}
    doc = {"algorithm": "sha256", "files": files}
    partial = step_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(doc, indent=1) + "\n")
    partial.replace(step_dir / MANIFEST)


def read_manifest(step_dir: Path) -> dict[str, dict[str, object]] | None:
    """{name: {"bytes", "sha256"}}, or None for a checkpoint saved before checksums were recorded."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(f["bytes"], int) and isinstance(f["sha256"], str) for f in files.values()):
            raise ValueError("bad entry")
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable checksum list ({type(exc).__name__}); the checkpoint cannot "
                          "be verified: resume from another step_* directory") from None


def size_problems(step_dir: Path, files: dict[str, dict[str, object]]) -> list[str]:
    """Files missing or of another size than saved (cheap: one stat each)."""
    out = []
    for name, entry in files.items():
        path = step_dir / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            out.append(f"{name} has {path.stat().st_size:,} bytes, the save wrote {entry['bytes']:,} "
                       "(truncated or replaced)")
    return out


def content_problems(step_dir: Path, files: dict[str, dict[str, object]], names: Iterable[str]) -> list[str]:
    """Of ``names``, the files whose SHA-256 differs from the save (bit rot, a bad copy)."""
    out = []
    for name in names:
        path = step_dir / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif file_digest(path)[1] != files[name]["sha256"]:
            out.append(f"{name}: SHA-256 differs from the one recorded at save (corrupted)")
    return out
