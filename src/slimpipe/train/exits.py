"""Exit codes of `slimpipe train` and its ranks, and the failures every rank reaches together. No torch.

A rank's exit code tells the launcher what to print: an *agreed* failure (every rank raises the same
AgreedError at the same point: a diverged loss, a corrupt checkpoint, a failed save) is reported once, by
rank 0, and the launcher adds nothing; a rank that stopped because another one failed exits PEER quietly
under the launcher, which names the rank that failed first.
"""

from __future__ import annotations

__all__ = ["OK", "FAILED", "BAD_INPUT", "DIVERGED", "SAVE_FAILED", "PEER", "AgreedError", "BadCheckpoint",
           "Diverged", "SaveFailed", "signal_exit"]

OK = 0
FAILED = 1
"""A rank failed (its own error, printed by it), or the job ended because one did."""
BAD_INPUT = 2
"""Bad input: flags, files, a checkpoint that does not verify. Nothing was written."""
DIVERGED = 3
"""The loss or gradient norm became nan/inf (--nonfinite stop, or skip after too many in a row)."""
SAVE_FAILED = 4
"""A checkpoint save failed (disk full, I/O error); the previous checkpoint is intact."""
PEER = 5
"""This rank stopped because another rank failed (quiet under the launcher, which names the culprit)."""


def signal_exit(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signum


class AgreedError(RuntimeError):
    """A failure every rank reaches at the same point with the same message (rank 0 prints it)."""

    exit_code = FAILED


class BadCheckpoint(AgreedError):
    """The checkpoint to resume from does not verify or does not load."""

    exit_code = BAD_INPUT


class Diverged(AgreedError):
    """A step's loss or gradient norm is not finite."""

    exit_code = DIVERGED


class SaveFailed(AgreedError):
    """A checkpoint could not be written."""

    exit_code = SAVE_FAILED
