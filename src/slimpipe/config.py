"""Model and parallel-layout configs: frozen dataclasses with fix-it errors. Imports no torch.

Letters follow the SlimPipe paper (see docs/design.md): L layers, h hidden, f FFN size, V vocabulary,
t/c/p/d/e tensor/context/pipeline/data/expert parallel sizes, n slices, v virtual stages, m micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelConfig", "RopeScaling", "ParallelConfig", "MODEL_PRESETS", "load_model", "ConfigError"]


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the field, the value and the fix."""


ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling for context extension (Hugging Face's ``rope_type`` linear or llama3)."""

    kind: str
    """linear (every frequency divided by factor) or llama3 (Llama 3.1's band-wise rule)."""
    factor: float
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_positions / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_positions / high_freq_factor are kept; between, smoothed."""
    original_max_positions: int = 8192
    """llama3: the context length the model was pretrained with."""

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(f"model.rope_scaling.kind={self.kind!r} is unknown: use one of {ROPE_SCALINGS}")
        if not self.factor > 0:
            raise ConfigError(f"model.rope_scaling.factor={self.factor!r} must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                f"model.rope_scaling: llama3 needs high_freq_factor > low_freq_factor > 0 (got "
                f"{self.high_freq_factor}, {self.low_freq_factor})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A Llama-family decoder (RMSNorm, RoPE, SwiGLU, GQA; optional top-k MoE MLP)."""

    name: str = "custom"
    """Preset or user name, for logs."""
    num_layers: int
    """L: transformer blocks."""
    hidden: int
    """h: model width."""
    ffn: int
    """f: SwiGLU intermediate size (per expert for MoE)."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """K/V heads (GQA groups); equal to num_heads for MHA."""
    head_dim: int
    """Width of one head; num_heads·head_dim is usually h."""
    vocab_size: int
    """V: vocabulary size (256 for the byte-level presets, 128256 for Llama-3's tokenizer)."""
    tie_embeddings: bool = False
    """Share the input embedding and output layer weights."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """RoPE frequency scaling (context-extended checkpoints such as Llama 3.1), or None."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    num_experts: int = 1
    """E: experts per MoE layer; 1 = dense SwiGLU MLP."""
    top_k: int = 1
    """Experts each token is routed to (MoE only)."""
    aux_loss_coeff: float = 0.01
    """α of the load-balancing loss α·E·Σ_e f_e·P_e per MoE layer and sequence (MoE only; 0 disables it).
    f_e: fraction of the sequence's k·s routed assignments that chose expert e; P_e: mean router
    probability of e over the sequence (docs/moe.md)."""
    capacity_factor: float | None = None
    """None = dropless; else each expert takes at most ⌈factor·k·t/E⌉ of the t tokens of one sequence's slice
    (one dispatch), the lowest-probability routed copies beyond that are dropped (MoE only)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from JSON (to_dict writes it as a table)
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as exc:
                raise ConfigError(f"model.rope_scaling={self.rope_scaling!r}: {exc}") from None
        for f in ("num_layers", "hidden", "ffn", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            val = getattr(self, f)
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"model.{f}={val!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
                f"{self.num_kv_heads}: GQA needs whole query groups; pick num_kv_heads dividing num_heads"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if not self.aux_loss_coeff >= 0:
            raise ConfigError(f"model.aux_loss_coeff={self.aux_loss_coeff!r} must be ≥ 0 (0 disables the loss)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"model.capacity_factor={self.capacity_factor!r} must be > 0, or None for dropless routing"
            )

    @property
    def kv_dim(self) -> int:
        """d_kv = kv_heads · head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one block: Q/O projections, K/V projections, MLP (all experts), two norms."""
        attn = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        mlp = 3 * self.hidden * self.ffn * self.num_experts
        router = self.hidden * self.num_experts if self.num_experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Total parameters N (tied embeddings counted once); final norm included."""
        emb = self.vocab_size * self.hidden * (1 if self.tie_embeddings else 2)
        if not include_embedding:
            emb -= self.vocab_size * self.hidden
        return self.num_layers * self.layer_params() + emb + self.hidden

    def active_params(self, *, include_embedding: bool = True) -> int:
        """Parameters a token touches (MoE: top_k of num_experts MLPs)."""
        inactive = 3 * self.hidden * self.ffn * (self.num_experts - self.top_k) * self.num_layers
        return self.num_params(include_embedding=include_embedding) - inactive

    def flops_per_token(self, seq_len: int, *, causal: bool = True, keys_per_query: float | None = None) -> float:
        """Model FLOPs of one training token (forward + backward, no recomputation): the MFU numerator.

        ``6·N + 6·L·H·Q·T`` by default: what the hardware executes for causal attention (each of the T
        queries sees (T+1)/2 keys on average; QKᵀ and AV are 4·H·Q FLOPs per query-key pair forward, 3×
        that with the backward), N = active parameters without the input-embedding lookup (the output layer
        once, also when tied), H·Q = heads × head_dim. ``causal=False`` is the dense PaLM/torchtitan
        convention ``6·N + 12·L·H·Q·T`` (attention counted as if unmasked: 2× the attention work done).
        Recomputation (flash attention's QKᵀ replay, activation recompute) is not counted: that is HFU.
        ``keys_per_query``: the mean keys a query attends to when that is not T/2 (packed documents:
        document-causal attention, slimpipe.sim.documents) — ``6·N + 12·L·H·Q·keys_per_query``.
        One place for every MFU in slimpipe (train, simulate, plan).

        >>> cfg = MODEL_PRESETS["tiny"]
        >>> cfg.flops_per_token(64, causal=False) - cfg.flops_per_token(64) == 6 * 8 * 128 * 64
        True
        """
        n = self.active_params(include_embedding=self.tie_embeddings)
        if keys_per_query is not None:
            return 6 * n + 12 * self.num_layers * self.q_dim * keys_per_query
        return 6 * n + (6 if causal else 12) * self.num_layers * self.q_dim * seq_len

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _llama(name: str, L: int, h: int, f: int, heads: int, kv: int, **kw: object) -> ModelConfig:
    # Tied: the authors' simulator counts one V·h matrix (P = L·P_layer + V·h + h, 69.50e9 for 70B).
    base = dict(vocab_size=128256, head_dim=128, rope_theta=1e6, tie_embeddings=True)
    base.update(kw)
    return ModelConfig(name=name, num_layers=L, hidden=h, ffn=f, num_heads=heads, num_kv_heads=kv, **base)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Byte-level presets for real CPU runs (tests, the embedded default of `slimpipe train`).
    "tiny": ModelConfig(name="tiny", num_layers=8, hidden=128, ffn=384, num_heads=4, num_kv_heads=2,
                        head_dim=32, vocab_size=256),
    "small": ModelConfig(name="small", num_layers=8, hidden=256, ffn=768, num_heads=8, num_kv_heads=4,
                         head_dim=32, vocab_size=256),
    # The MoE counterpart of "tiny": 4 SwiGLU experts of f = 256, top-2 (CPU tests, bars).
    "tiny-moe": ModelConfig(name="tiny-moe", num_layers=8, hidden=128, ffn=256, num_heads=4, num_kv_heads=2,
                            head_dim=32, vocab_size=256, num_experts=4, top_k=2),
    # ~1.2B Llama-3.2-1B-like shape for the single-GPU checks.
    "llama-1b": _llama("llama-1b", 16, 2048, 8192, 32, 8, head_dim=64, tie_embeddings=True),
    # The paper's setup table (SlimPipe §14): head_dim 128, V = 128256.
    "llama-7b": _llama("llama-7b", 32, 4096, 11008, 32, 32),
    "llama-13b": _llama("llama-13b", 40, 5120, 13824, 40, 40),
    "llama-70b": _llama("llama-70b", 80, 8192, 28672, 64, 8),
    "llama-150b": _llama("llama-150b", 96, 12288, 32768, 96, 8),
    "mixtral-8x7b": _llama("mixtral-8x7b", 32, 4096, 14336, 32, 8, num_experts=8, top_k=2),
    "mixtral-8x22b": _llama("mixtral-8x22b", 56, 6144, 16384, 48, 8, num_experts=8, top_k=2),
}


def load_model(name_or_path: str, **overrides: object) -> ModelConfig:
    """A preset by name or a JSON file of ModelConfig fields, with single fields overridden.

    >>> load_model("llama-70b", vocab_size=32000).vocab_size
    32000
    """
    if name_or_path in MODEL_PRESETS:
        cfg = MODEL_PRESETS[name_or_path]
    elif name_or_path.endswith(".json"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"--model {name_or_path}: no such file; give a preset or a JSON file path")
        try:
            fields = json.loads(path.read_text())
            cfg = ModelConfig(**{"name": path.stem, **fields})
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"--model {name_or_path}: not a valid ModelConfig JSON ({exc})") from None
    else:
        raise ConfigError(
            f"--model {name_or_path!r} is unknown: use one of {sorted(MODEL_PRESETS)} or a .json file"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """How a run is laid out over GPUs: GPUs = t·c·p·d.

    MoE layers reuse the same GPUs (Megatron's layout): per pipeline stage the t·c·d GPUs split into
    expert-TP (size ``etp``) × expert-parallel (e) × expert-data-parallel groups, so ``etp·e`` divides t·c·d;
    with the default etp = t the expert groups lie inside the data(×context)-parallel ranks (e divides c·d).
    """

    tp: int = 1
    """t: tensor-parallel size (with sequence parallelism)."""
    cp: int = 1
    """c: context-parallel size."""
    pp: int = 1
    """p: pipeline-parallel size."""
    dp: int = 1
    """d: data-parallel size."""
    ep: int = 1
    """e: expert-parallel size (MoE only)."""
    etp: int | None = None
    """Expert tensor-parallel size (MoE only): None = t (Megatron's default, experts sharded like the dense
    MLP); 1 = whole experts on every GPU, the expert group then may span the TP ranks (e divides t·c·d)."""
    vpp: int = 1
    """v: virtual stages per pipeline rank."""
    slices: int = 1
    """n: slices per sequence."""
    micro_batch: int = 1
    """b: sequences per micro-batch (SlimPipe uses 1)."""

    def __post_init__(self) -> None:
        for f in ("tp", "cp", "pp", "dp", "ep", "vpp", "slices", "micro_batch"):
            val = getattr(self, f)
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"--{f.replace('_', '-')}={val!r} must be a positive integer")
        if self.etp is not None and self.etp not in (1, self.tp):
            raise ConfigError(
                f"--etp={self.etp!r} must be 1 or --tp={self.tp}: experts are either sharded like the dense "
                "MLP (the default) or whole on every GPU"
            )

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size: ``etp``, or t when unset."""
        return self.tp if self.etp is None else self.etp

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def microbatches(self, global_batch: int) -> int:
        """m = B / (b·d); raises if it does not divide."""
        per = self.micro_batch * self.dp
        if global_batch % per:
            raise ConfigError(
                f"--global-batch={global_batch} is not a multiple of micro_batch·dp={per}: "
                f"use a multiple of {per}"
            )
        return global_batch // per

    def check_layers(self, num_layers: int) -> None:
        if num_layers % (self.pp * self.vpp):
            raise ConfigError(
                f"num_layers={num_layers} is not divisible by pp·vpp={self.pp}·{self.vpp}: "
                f"choose pp and vpp whose product divides {num_layers}"
            )
