"""A Llama-family decoder as plain nn.Modules: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameter names (relative to the pipeline's rank model, see slimpipe.runtime.stage): ``embed.weight``,
``layers.<i>.attn_norm.weight``, ``layers.<i>.attn.{wq,wk,wv,wo}.weight``, ``layers.<i>.mlp_norm.weight``,
``layers.<i>.mlp.{w1,w2,w3}.weight`` (MoE: ``layers.<i>.mlp.router.weight`` and
``layers.<i>.mlp.experts.<e>.{w1,w2,w3}.weight``, models/moe.py), ``norm.weight``, ``head.weight`` (absent
when tied). No biases, no dropout. Attention goes through ``ctx.attend`` so the same block runs unsliced (reference) or as one slice
of a pipelined sequence with its K/V prefix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimpipe.config import ConfigError, ModelConfig, RopeScaling
from slimpipe.models.base import LayerContext
from slimpipe.models.fused import rms_norm, swiglu
from slimpipe.models.moe import ExpertPlacement, MoEMLP

__all__ = ["LlamaParts", "RMSNorm", "Attention", "MLP", "Block", "Head", "rope_tables", "rope_inv_freq", "apply_rope"]

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # statistics in fp32 at least; saves x and rstd only


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                  device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float64, with Hugging Face's ``linear`` or ``llama3`` scaling.

    llama3 (Llama 3.1): wavelengths longer than original/low_freq_factor are divided by factor, shorter
    than original/high_freq_factor kept, and the band between interpolated smoothly.
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    old, lo, hi = scaling.original_max_positions, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / scaling.factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_tables(start: int, length: int, head_dim: int, theta: float, *, device: torch.device,
                dtype: torch.dtype, scaling: RopeScaling | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim) for global positions [start, start + length), or for
    ``positions`` (length,) when given (context parallelism's zig-zag pieces, packed documents).

    Angles are computed per position in float64, so a slice's table equals the matching rows of the whole
    sequence's table bit for bit (sliced and unsliced runs see the same numbers).
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=device)
    if positions is not None:
        pos = positions.to(device=device, dtype=torch.float64)
    else:
        pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    ang = torch.outer(pos, inv_freq)  # (t, d/2)
    ang = torch.cat([ang, ang], dim=-1)  # (t, d): rotate-half layout
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, t, heads, d); cos/sin (t, d)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    return tuple(layer(x) for layer in layers)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling
        self.wq = nn.Linear(cfg.hidden, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.hidden, bias=False)
        # Tensor-parallel seams: models/llama_parallel.py swaps in the column-/row-parallel linears of
        # sequence parallelism (x then holds 1/T of the slice's tokens, the heads are H/T).
        self.columns, self.rows = _linears, _linear

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.project_out(self.core(x, ctx))

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention output a (b, t, H·d) -> (b, t, h)."""
        return self.rows(self.wo, a)

    def core(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Normalised x (b, t, h) -> attention output before the output projection (b, t, H·d)."""
        q, k, v = self.columns(x, self.wq, self.wk, self.wv)  # (b, t, H·d), (b, t, H_kv·d) ×2
        b, t, _ = q.shape
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        key = f"rope:{self.head_dim}:{self.theta}:{self.scaling}"
        if key not in ctx.shared:  # once per slice, shared by every layer of the stage
            ctx.shared[key] = rope_tables(ctx.start, t, self.head_dim, self.theta, device=x.device,
                                          dtype=x.dtype, scaling=self.scaling, positions=ctx.positions)
        cos, sin = ctx.shared[key]  # type: ignore[misc]
        out = ctx.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (b, t, H, d)
        return out.reshape(b, t, self.heads * self.head_dim)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)
        self.columns, self.rows = _linears, _linear  # tensor-parallel seams, as in Attention

    def forward(self, x: torch.Tensor, ctx: LayerContext | None = None) -> torch.Tensor:
        """x (b, t, h); with ``ctx.recompute == "partial"`` the SwiGLU output is not kept but replayed."""
        gate, up = self.columns(x, self.w1, self.w3)  # (b, t, f) each: the SwiGLU input every mode but full keeps
        if ctx is not None and ctx.recompute == "partial":
            return ctx.checkpoint(self._down, gate, up)
        return self._down(gate, up)

    def _down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.rows(self.w2, swiglu(gate, up))


class Block(nn.Module):
    """Pre-norm decoder block.

    Recompute modes (slimpipe.sim.memory's definitions; ``ctx.recompute``, replayed per slice through
    ``ctx.checkpoint``), kept per token: ``none`` norm-1 input and output, Q, K, V, attention output,
    norm-2 input and output, gate and up, SwiGLU output (6h + 2·d_kv + 3f elements); ``partial`` the same
    without the SwiGLU output; ``partial+fc1`` norm-1 input and output, Q, K, V, attention output
    (4h + 2·d_kv); ``full`` (applied by the runtime around the whole block) the block input. The
    partial+fc1 region starts at the block input and the attention output, which norm-1 and the attention
    keep anyway, so it keeps nothing of its own; its replay re-runs the output projection and the residual
    add that rebuild norm-2's input, then norm-2, fc1 and SwiGLU (early stop before fc2).
    """

    recompute_modes = ("none", "partial", "partial+fc1", "full")

    def __init__(self, cfg: ModelConfig, index: int = 0, placement: ExpertPlacement | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp: nn.Module = MLP(cfg) if cfg.num_experts == 1 else MoEMLP(
            layer=index, hidden=cfg.hidden, num_experts=cfg.num_experts, top_k=cfg.top_k,
            aux_loss_coeff=cfg.aux_loss_coeff, capacity_factor=cfg.capacity_factor,
            make_expert=lambda: MLP(cfg), placement=placement)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        a = self.attn.core(self.attn_norm(x), ctx)  # (b, t, H·d)
        if ctx.recompute == "partial+fc1":  # ctx too: an MoE MLP needs the slice's routing context
            return ctx.checkpoint(self._rest, x, a, ctx)
        return self._rest(x, a, ctx)

    def _rest(self, x: torch.Tensor, a: torch.Tensor, ctx: LayerContext | None = None) -> torch.Tensor:
        """Output projection, residual, norm-2, MLP, residual."""
        x = x + self.attn.project_out(a)
        return x + self.mlp(self.mlp_norm(x), ctx)


class Head(nn.Module):
    """Output layer; with ``tied`` it reads the embedding's weight and owns no parameter."""

    def __init__(self, cfg: ModelConfig, tied: nn.Module | None) -> None:
        super().__init__()
        # A list hides the tied embedding from module registration: it is registered once, as ``embed``.
        self._tied = [tied] if tied is not None else []
        if tied is None:
            self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._tied[0].weight if self._tied else self.weight
        return nn.functional.linear(x, weight)  # (b, t, V)


class LlamaParts:
    """DecoderParts for a ModelConfig: dense Llama blocks, or Mixtral-style MoE blocks when num_experts > 1
    (``placement`` says which experts this rank holds; default all of them)."""

    def __init__(self, cfg: ModelConfig, *, init_std: float = 0.02,
                 placement: ExpertPlacement | None = None) -> None:
        if placement is not None and cfg.num_experts % placement.size:
            raise ConfigError(
                f"--ep={placement.size} does not divide model.num_experts={cfg.num_experts}: pick a divisor"
            )
        self.cfg, self.placement = cfg, placement
        self.num_layers, self.hidden, self.vocab_size = cfg.num_layers, cfg.hidden, cfg.vocab_size
        self.tie_embeddings = cfg.tie_embeddings
        self.init_std = init_std

    def embedding(self) -> nn.Module:
        return nn.Embedding(self.cfg.vocab_size, self.cfg.hidden)

    def block(self, index: int) -> nn.Module:
        return Block(self.cfg, index, self.placement)

    def final_norm(self) -> nn.Module:
        return RMSNorm(self.cfg.hidden, self.cfg.norm_eps)

    def head(self, tied: nn.Module | None) -> nn.Module:
        return Head(self.cfg, tied)

    def parallelize(self, model: nn.Module, tp: object) -> dict[str, object]:
        """Megatron TP + sequence parallelism on the parts one rank holds (models/llama_parallel.py);
        {global parameter name: Shard} of what got split."""
        from slimpipe.models.llama_parallel import parallelize_llama

        return parallelize_llama(model, self.cfg, tp)  # type: ignore[arg-type]

    def init_parameter(self, name: str, param: torch.Tensor, generator: torch.Generator) -> None:
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            return
        std = self.init_std
        if name.endswith(("attn.wo.weight", ".w2.weight")):  # GPT-2 style residual scaling (experts too)
            std = std / math.sqrt(2 * self.cfg.num_layers)
        param.normal_(0.0, std, generator=generator)
