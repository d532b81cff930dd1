"""The step API both runtimes share: forward_backward and train_step over a runtime-specific ``_run``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from slimpipe.config import ConfigError
from slimpipe.runtime.documents import StepDocs
from slimpipe.runtime.optim import OptimConfig, clip_coefficient, scale_grads
from slimpipe.runtime.result import StepResult
from slimpipe.schedule.actions import Schedule
from slimpipe.runtime.vocab import with_vocab
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import forward_only, lower
from slimpipe.schedule.validate import validate

__all__ = ["StepLoop"]


class StepLoop:
    """Subclasses provide ``_run`` (execute the schedule), ``_reduce_grads`` (tied replicas, DP),
    ``_grad_norm`` (global, tied params once), ``_trainable_parameters``, ``zero_grad``, ``optimizer`` and
    ``optim_config``; the order of operations of a step lives here once."""

    optimizer: torch.optim.Optimizer
    optim_config: OptimConfig
    schedule: Schedule
    vocab_parallel: bool

    def forward_backward(self, tokens: torch.Tensor, *, reduce_grads: bool = False,
                         loss_tokens: int | None = None, documents: torch.Tensor | None = None) -> StepResult:
        """Run the schedule, accumulating into .grad. ``reduce_grads`` also sums tied-embedding grads and
        all-reduces over DP (what train_step does before clipping). ``loss_tokens`` overrides the loss
        normaliser (default: every loss-taking label of the global batch, m·s·dp without documents).
        ``documents`` (m, s+1): packed documents, each token's document index (non-decreasing along a row):
        document-causal attention, no loss across a boundary, positions per document unless the runtime
        was built with ``restart_positions=False`` (runtime/documents.py)."""
        res = self._run(tokens, loss_tokens, documents=documents)
        if reduce_grads:
            self._reduce_grads()
        return res

    def train_step(self, tokens: torch.Tensor, *, loss_tokens: int | None = None,
                   skip_nonfinite: bool = False, documents: torch.Tensor | None = None) -> StepResult:
        """zero_grad, forward_backward, grad reduction, clipping (global norm) and one AdamW step.

        ``skip_nonfinite``: no update when the loss or the grad norm is nan/inf (both are global, so every
        rank skips the same step); the result says so through its non-finite loss/grad_norm."""
        self.zero_grad()
        res = self._run(tokens, loss_tokens, documents=documents)
        self._reduce_grads()
        norm = self._grad_norm()
        if skip_nonfinite and not (math.isfinite(norm) and math.isfinite(res.loss)):
            return dataclasses.replace(res, grad_norm=norm)
        scale_grads(self._trainable_parameters(), clip_coefficient(norm, self.optim_config.clip))
        self.optimizer.step()
        return dataclasses.replace(res, grad_norm=norm)

    def evaluate(self, tokens: torch.Tensor, *, loss_tokens: int | None = None,
                 documents: torch.Tensor | None = None) -> StepResult:
        """Forward only, under no_grad: the loss of ``tokens`` (rows, s+1), any number of rows.

        Runs the forward half of a GPipe-ordered schedule with this runtime's p, n and v (every builder's
        forward order is a pipeline of (micro-batch, slice) units, so one order serves them all), K/V
        carried across slices as in training; no activation is kept, no gradient touched.
        ``loss_tokens`` as in forward_backward (default: every token of the rows, times dp)."""
        if self._has_exchange():
            raise ConfigError("evaluate runs without attention exchange: build the runtime with attn_balance=0")
        with torch.no_grad():
            return self._run(tokens, loss_tokens, self._eval_schedule(tokens.size(0)), documents=documents)

    def _docs(self, tokens: torch.Tensor, documents: torch.Tensor | None) -> StepDocs | None:
        """The step's packed documents (tokens already on the runtime's device), or None."""
        if documents is None:
            return None
        if self._has_exchange():
            raise ConfigError("packed documents run without attention exchange: build the runtime with "
                              "attn_balance=0")
        state = getattr(self, "state", None)
        if state is not None and state.cp > 1:
            raise ConfigError("packed documents run without context parallelism: use cp=1")
        return StepDocs.of(tokens, documents.to(tokens.device),
                           restart_positions=getattr(self, "restart_positions", True))

    def _eval_schedule(self, rows: int) -> Schedule:
        cache = self.__dict__.setdefault("_eval_schedules", {})
        if rows not in cache:
            s = self.schedule
            plain = build("gpipe", p=s.num_ranks, m=rows, n=s.num_slices, v=s.virtual_stages)
            full = lower(with_vocab(plain, self.vocab_parallel))
            validate(full)
            cache[rows] = forward_only(full)  # slice bounds stay the runtime schedule's (executor)
        return cache[rows]

    # ---- provided by the runtime --------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, loss_tokens: int | None, evaluate: Schedule | None = None, *,
             documents: torch.Tensor | None = None) -> StepResult:
        """One step; ``evaluate``: run this forward-only schedule instead of the training one;
        ``documents``: packed documents (``_docs``)."""
        raise NotImplementedError

    def _has_exchange(self) -> bool:
        raise NotImplementedError

    def _reduce_grads(self) -> None:
        raise NotImplementedError

    def _grad_norm(self) -> float:
        raise NotImplementedError

    def _trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError
