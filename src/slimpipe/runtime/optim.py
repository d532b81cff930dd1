"""Optimizer config, AdamW construction and grad-norm clipping shared by both runtimes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OptimConfig", "build_optimizer", "squared_norm", "clip_coefficient", "scale_grads"]


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW and clipping settings (SlimPipe reference §14 uses betas (0.9, 0.95), clip 1.0)."""

    lr: float = 3e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2."""
    eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (norm weights are not decayed)."""
    clip: float | None = 1.0
    """Max global grad norm (all ranks, tied weights counted once); None or 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.clip is not None and self.clip < 0:
            raise ValueError(f"optim.clip={self.clip} must be ≥ 0 (0 or None disables clipping)")


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two groups: decayed matrices, undecayed vectors (norm weights)."""
    decay, keep = [], []
    for _, p in named:
        (decay if p.ndim >= 2 else keep).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def squared_norm(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """Σ‖grad‖² over params with a gradient, in float64 (a 0-dim tensor on ``device``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    return total


def clip_coefficient(norm: float, clip: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, clip / (norm + 1e-6)); 1 when clipping is off."""
    if not clip:
        return 1.0
    return min(1.0, clip / (norm + 1e-6))


def scale_grads(params: Iterable[nn.Parameter], coef: float) -> None:
    if coef == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
