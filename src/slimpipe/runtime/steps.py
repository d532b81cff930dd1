"""The step API both runtimes share: forward_backward and train_step over a runtime-specific ``_run``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from slimpipe.runtime.optim import OptimConfig, clip_coefficient, scale_grads
from slimpipe.runtime.result import StepResult

__all__ = ["StepLoop"]


class StepLoop:
    """Subclasses provide ``_run`` (execute the schedule), ``_reduce_grads`` (tied replicas, DP),
    ``_grad_norm`` (global, tied params once), ``_trainable_parameters``, ``zero_grad``, ``optimizer`` and
    ``optim_config``; the order of operations of a step lives here once."""

    optimizer: torch.optim.Optimizer
    optim_config: OptimConfig

    def forward_backward(self, tokens: torch.Tensor, *, reduce_grads: bool = False,
                         loss_tokens: int | None = None) -> StepResult:
        """Run the schedule, accumulating into .grad. ``reduce_grads`` also sums tied-embedding grads and
        all-reduces over DP (what train_step does before clipping). ``loss_tokens`` overrides the loss
        normaliser (default: every token of the global batch, m·s·dp)."""
        res = self._run(tokens, loss_tokens)
        if reduce_grads:
            self._reduce_grads()
        return res

    def train_step(self, tokens: torch.Tensor, *, loss_tokens: int | None = None,
                   skip_nonfinite: bool = False) -> StepResult:
        """zero_grad, forward_backward, grad reduction, clipping (global norm) and one AdamW step.

        ``skip_nonfinite``: no update when the loss or the grad norm is nan/inf (both are global, so every
        rank skips the same step); the result says so through its non-finite loss/grad_norm."""
        self.zero_grad()
        res = self._run(tokens, loss_tokens)
        self._reduce_grads()
        norm = self._grad_norm()
        if skip_nonfinite and not (math.isfinite(norm) and math.isfinite(res.loss)):
            return dataclasses.replace(res, grad_norm=norm)
        scale_grads(self._trainable_parameters(), clip_coefficient(norm, self.optim_config.clip))
        self.optimizer.step()
        return dataclasses.replace(res, grad_norm=norm)

    # ---- provided by the runtime --------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, loss_tokens: int | None) -> StepResult:
        raise NotImplementedError

    def _reduce_grads(self) -> None:
        raise NotImplementedError

    def _grad_norm(self) -> float:
        raise NotImplementedError

    def _trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError
