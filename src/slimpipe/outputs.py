"""One output policy for every command that writes files (train, plot, calibrate). No torch.

Checked before any expensive work: a path must not be a directory, its directory must exist (train creates
its run directory) and take a new file, and an existing file is replaced only with ``--overwrite``. Every
violation is a ConfigError whose one line names the flag, the path and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from slimpipe.config import ConfigError

__all__ = ["check_output_file", "writable_dir"]

_FIX = "pass --overwrite to replace it, or choose another path"


def writable_dir(path: Path, flag: str, *, create: bool = False) -> None:
    """``path`` is a directory this process can create files in (made first when ``create``).

    Probed with a real file rather than os.access, which says yes to root on a read-only mount.
    """
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise ConfigError(f"{flag}: directory {path} {what}: create it or choose another path")
        probe = path / f".slimpipe-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: not writable ({exc.strerror}); choose a writable "
                          "directory") from None


def check_output_file(path: str, flag: str, *, overwrite: bool, suffixes: Collection[str] = (),
                      create_dir: bool = False, fix: str = _FIX) -> Path:
    """Check that ``path`` can be written as a new file (or replaced, with ``overwrite``); returns it.

    ``suffixes``: allowed extensions without the dot (empty: any).
    """
    out = Path(path)
    if out.is_dir():
        example = out / _example(suffixes)
        raise ConfigError(f"{flag} {path} is a directory: give a file path inside it, e.g. {example}")
    if suffixes and out.suffix.lower().lstrip(".") not in suffixes:
        raise ConfigError(f"{flag} {path}: unknown file type {out.suffix or '(no extension)'!r}: use one of "
                          + ", ".join(f".{s}" for s in sorted(suffixes)))
    writable_dir(out.parent, flag, create=create_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists: {fix}")
    return out


def _example(suffixes: Collection[str]) -> str:
    return f"out.{next(iter(suffixes))}" if suffixes else "out"
