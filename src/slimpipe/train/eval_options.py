"""What `slimpipe eval` adds to a run's config. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.config import ConfigError

__all__ = ["EvalOptions"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalOptions:
    """An evaluation over the data's non-overlapping windows."""

    batch: int = 4
    """Windows per forward-only step (micro-batches of the pipeline)."""
    max_windows: int = 0
    """Evaluate at most this many windows from the start (0: all of them)."""
    json: bool = False
    """Print one JSON object instead of text."""

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"--batch={self.batch} must be ≥ 1")
        if self.max_windows < 0:
            raise ConfigError(f"--max-windows={self.max_windows} must be ≥ 0")
