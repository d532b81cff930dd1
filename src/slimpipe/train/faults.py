"""TEST HOOK: make one rank vanish at a chosen point, so tests can fault a real run. No torch.

``SLIMPIPE_FAULT_RANK=r`` and ``SLIMPIPE_FAULT_STEP=k`` make rank r call ``os._exit(13)`` at the start of
step k; ``SLIMPIPE_FAULT_STEP=savek`` makes it vanish in the middle of the checkpoint save of step k (its
shards written, nothing renamed). Unset, the hook costs two dictionary lookups.
"""

from __future__ import annotations

import os
import sys

__all__ = ["fault_hook", "FAULT_EXIT"]

FAULT_EXIT = 13
"""Exit code of a rank the hook removed."""


def fault_hook(rank: int, point: int | str) -> None:
    """Exit this process at ``point`` (a step number or ``save<step>``) when the environment asks for it."""
    env = os.environ
    if env.get("SLIMPIPE_FAULT_RANK") == str(rank) and env.get("SLIMPIPE_FAULT_STEP") == str(point):
        sys.stderr.write(f"slimpipe train: rank {rank}: SLIMPIPE_FAULT_* test hook: exiting at {point}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT)
