"""What is being trained and how it is laid out: the input of the cost and memory models. Imports no torch.

Letters follow the SlimPipe reference (§1): s sequence length, B global batch, m = B/(b·d) micro-batches,
t/c/p/d/e parallel sizes, n slices, v virtual stages, l = L/(p·v) layers per virtual stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig
from slimpipe.rules import check_layout
from slimpipe.sim.documents import DocLengths

__all__ = ["Workload", "RECOMPUTE_MODES"]

RECOMPUTE_MODES = ("none", "partial", "partial+fc1", "full")
"""none; partial = activation function only; partial+fc1 = norm-2 + fc1 + SwiGLU (MoE: also the token
dispatcher); full = the whole layer from its input (K/V still persist for later slices)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """A model, a parallel layout and one training step's data, checked for consistency."""

    model: ModelConfig
    """The transformer being trained."""
    parallel: ParallelConfig
    """t, c, p, d, e, v, n, b."""
    seq_len: int
    """s: tokens per sequence."""
    global_batch: int
    """B: sequences per optimizer step (all data-parallel replicas)."""
    recompute: str = "none"
    """Activation recomputation mode, one of RECOMPUTE_MODES."""
    offload: float = 0.0
    """α: fraction of saved activations offloaded to host memory, in [0, 1)."""
    vocab_parallel: bool = False
    """Embedding/output layer sharded over the t·p group (SlimPipe §9) instead of living on the end stages."""
    documents: DocLengths | None = None
    """Packed documents drawn from this length distribution (``--doc-lengths``): attention is priced as
    document-causal (slimpipe.sim.documents); None: one causal sequence."""

    def __post_init__(self) -> None:
        par, mod = self.parallel, self.model
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"--seq-len={self.seq_len!r} must be a positive integer")
        if not isinstance(self.global_batch, int) or self.global_batch < 1:
            raise ConfigError(f"--global-batch={self.global_batch!r} must be a positive integer")
        if self.recompute not in RECOMPUTE_MODES:
            modes = ", ".join(RECOMPUTE_MODES)
            raise ConfigError(f"--recompute={self.recompute!r} is unknown: use one of {modes}")
        if not 0.0 <= self.offload < 1.0:
            raise ConfigError(f"--offload={self.offload!r} must be in [0, 1): it is the offloaded fraction α")
        # layers, heads/FFN/vocab by t, s by n·t·2c, experts (slimpipe.rules)
        check_layout(mod, par, self.seq_len, vocab_parallel=self.vocab_parallel)
        par.microbatches(self.global_batch)

    @property
    def microbatches(self) -> int:
        """m = B / (b·d)."""
        return self.parallel.microbatches(self.global_batch)

    @property
    def layers_per_stage(self) -> int:
        """l = L / (p·v)."""
        return self.model.num_layers // (self.parallel.pp * self.parallel.vpp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

