"""Two autograd ops that save for backward exactly what the memory model counts, and no more.

The SlimPipe memory model (slimpipe.sim.memory, reference §6.1) counts per token and layer the norm's
input and output, Q, K, V, the attention output, the SwiGLU input (gate and up) and its output. Composed
from torch ops, two parts of a Llama block save more than that:

* RMSNorm: ``x.float() * rsqrt(...)`` saves an fp32 copy of the input and, for 16-bit inputs, the fp32
  normalised tensor too (``torch.nn.functional.rms_norm`` on CPU is the same composite in torch 2.13:
  measured, it saves x in fp32 twice plus the fp32 product). :class:`RMSNormFn` saves the input in its own
  dtype and one fp32 rstd per token; the output is what the next linear saves anyway.
* SwiGLU ``silu(g) * u`` saves g, silu(g) and u, then the down projection saves the product: 4f per token
  against the model's 3f. :class:`SwiGLUFn` saves g and u and recomputes silu(g) in its backward (as
  Megatron's fused SwiGLU does); torch has no fused SwiGLU op.

Forward values are bit-identical to the composite versions they replace; backward uses the same formulas
(``aten.silu_backward``), so gradients agree to rounding.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["RMSNormFn", "SwiGLUFn", "rms_norm", "swiglu"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class RMSNormFn(torch.autograd.Function):
    """x (..., h), weight (h) -> (x·rstd) in x's dtype · weight; the statistics in fp32 at least."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, rstd, weight = ctx.saved_tensors
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        xhat = xf * rstd  # (..., h)
        dw = (dy * xhat.to(x.dtype)).reshape(-1, x.size(-1)).sum(0) if ctx.needs_input_grad[1] else None
        g = (dy * weight).to(xhat.dtype)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


class SwiGLUFn(torch.autograd.Function):
    """gate, up (..., f) -> silu(gate) · up; saves only gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(dy * up, gate) if ctx.needs_input_grad[0] else None
        d_up = dy * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFn.apply(x, weight, eps)  # type: ignore[no-any-return]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFn.apply(gate, up)  # type: ignore[no-any-return]
