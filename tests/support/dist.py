"""Distributed tests: slimpipe's own forked-ranks harness with the tests' one-minute hang limit."""

from __future__ import annotations

from collections.abc import Callable

from slimpipe.runtime.forked import run_forked

__all__ = ["run_dist"]


def run_dist(fn: Callable, world: int, *args: object, timeout_s: float = 60.0) -> list[object]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks (slimpipe.runtime.forked.run_forked: fork, or
    spawn where CUDA exists); each rank's return value. ``timeout_s`` is the process-group timeout: a
    hang fails the test in a minute. ``fn`` must be a module-level function (spawn pickles it)."""
    return run_forked(fn, world, *args, timeout_s=timeout_s)
