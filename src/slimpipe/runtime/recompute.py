"""Activation recompute per slice: the modes, the check that a model supports one, and the checkpoint call.

The modes are the memory model's (slimpipe.sim.memory, reference §6.1), per token and layer:

========== ============================================ ======================================
mode       kept for backward                            replayed in the slice's backward
========== ============================================ ======================================
none       norm-1 in/out, Q, K, V, attn out, norm-2     nothing
           in/out, gate+up, SwiGLU out
partial    the same without the SwiGLU output           SwiGLU
partial+fc1 norm-1 in/out, Q, K, V, attn out            output projection + residual, norm-2,
                                                        fc1, SwiGLU
full       the block input (+ K/V in the store)         the whole block, attention included
========== ============================================ ======================================

Regions go through non-reentrant ``torch.utils.checkpoint`` (its early stop skips the last GEMM whose
input is the only thing still needed). Recompute is per slice: a region replays inside the backward of the
unit that ran it, with ``context_fn`` marking the slice's K/V view as *replaying*: attention then reads the
slice's K/V window from the store and never writes it (kv.SliceKV), and with the attention exchange the
replayed attention trades with the backward partner, at the backward's volume (runtime/exchange.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from slimpipe.config import ConfigError
from slimpipe.sim.workload import RECOMPUTE_MODES

__all__ = ["RECOMPUTE_MODES", "check_recompute", "replayed"]


def check_recompute(mode: str, block: torch.nn.Module) -> None:
    """Raise ConfigError unless ``block`` can run recompute ``mode`` (none and full work for any block)."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute={mode!r} is unknown: use one of {', '.join(RECOMPUTE_MODES)}")
    if mode in ("none", "full"):
        return
    supported = getattr(block, "recompute_modes", ("none", "full"))
    if mode not in supported:
        raise ConfigError(
            f"recompute={mode!r}: block {type(block).__name__} implements {tuple(supported)} only; use "
            "'full' (any block) or 'none', or give the block a recompute_modes attribute and regions"
        )


def replayed(fn: Callable[..., torch.Tensor], args: tuple[object, ...],
             replay: Callable[[], AbstractContextManager[None]]) -> torch.Tensor:
    """``fn(*args)`` under non-reentrant checkpoint; ``replay()`` is entered around the recomputation."""
    return checkpoint(fn, *args, use_reentrant=False,  # type: ignore[no-any-return]
                      context_fn=lambda: (nullcontext(), replay()))
