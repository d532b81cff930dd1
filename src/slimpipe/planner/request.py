"""What `slimpipe plan` is asked (PlanRequest) and what it answers (Plan, PlanResult)."""

from __future__ import annotations

from dataclasses import dataclass

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.rules import exchange_problem
from slimpipe.sim.documents import DocLengths
from slimpipe.sim.hardware import Hardware

__all__ = [
    "SCHEDULES", "RECOMPUTE_LADDER", "OFFLOAD_LADDER", "HOST_LINK_BW", "EXCHANGE_SCHEDULES", "PlanRequest",
    "Plan", "PlanResult", "exchange_applies", "SPLIT_SCHEDULES", "slice_splits",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "seq1f1b", "slimpipe")
RECOMPUTE_LADDER = ("none", "partial+fc1", "full")
"""Recompute modes tried per layout, cheapest (in time) first."""
OFFLOAD_LADDER = (0.0, 0.5, 0.75)
"""Offload fractions α tried per recompute mode, smallest first."""
HOST_LINK_BW = 25e9
"""Assumed achievable GPU↔host bandwidth per GPU and direction (PCIe Gen5 x16, shared), bytes/s: offload
is kept only if moving every unit's offloaded bytes out and back fits in the rank's busy time."""
EXCHANGE_SCHEDULES = ("slimpipe",)
"""Families the attention context exchange is tried for: it needs equal slices (seq1f1b plans use its
equal-FLOP segments) and concurrent slices on other ranks (n > 1, p > 1)."""
SLICED = ("seq1f1b", "slimpipe")
SPLIT_SCHEDULES = ("slimpipe",)
"""Families searched with both slice splits (equal, equal-flop); seq1f1b keeps its own equal-FLOP rule."""
INTERLEAVED = ("interleaved-1f1b", "slimpipe")


def exchange_applies(name: str, p: int, n: int) -> bool:
    """Whether a plan of family ``name`` on p ranks with n slices can use the attention context exchange."""
    return name in EXCHANGE_SCHEDULES and exchange_problem(name, p, n, 1) is None


def slice_splits(name: str, n: int, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The slice splits a plan of family ``name`` with n slices is tried with: ``allowed`` for slimpipe
    with n > 1; the builder's own split otherwise (equal-flop for seq1f1b, equal for the rest)."""
    if name in SPLIT_SCHEDULES and n > 1:
        return allowed
    return ("equal-flop",) if name == "seq1f1b" and n > 1 else ("equal",)


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRequest:
    """What to plan for, and how wide to search."""

    model: ModelConfig
    """The transformer."""
    seq_len: int
    """s: tokens per sequence."""
    gpus: int
    """G = t·c·p·d."""
    hardware: Hardware
    """GPU type (HBM is the memory limit; FLOP/s and links drive the cost model)."""
    schedules: tuple[str, ...] = SCHEDULES
    """Schedule families to enumerate."""
    global_batch_tokens: int = 4 << 20
    """T: tokens per optimizer step (4 Mi as in the paper); B = T/s."""
    top: int = 10
    """K: plans to return."""
    max_simulations: int = 32
    """Cap on full simulations; beyond it the remaining candidates are reported as not simulated."""
    recompute: tuple[str, ...] = RECOMPUTE_LADDER
    """Recompute modes to try, in order of increasing time cost."""
    offload: tuple[float, ...] = OFFLOAD_LADDER
    """Offload fractions α to try, in increasing order."""
    vocab_parallel: tuple[bool, ...] = (False, True)
    """Vocabulary placements to try (True: embedding/output sharded over t·p, SlimPipe §9)."""
    exchange: tuple[bool, ...] = (False, True)
    """Attention context exchange settings to try (True: SlimPipe §8, unclipped; only where
    ``exchange_applies``, so (True,) keeps only slimpipe plans with n > 1 and p > 1)."""
    slice_split: tuple[str, ...] = ("equal", "equal-flop")
    """Slice splits to try for slimpipe (equal token counts, equal-FLOP slices; the exchange needs equal)."""
    documents: DocLengths | None = None
    """Packed documents of these lengths (``--doc-lengths``): attention priced document-causal, no exchange."""

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            raise ConfigError(f"--gpus={self.gpus!r} must be a positive integer (the GPU count G = t·c·p·d)")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"--seq-len={self.seq_len!r} must be a positive integer")
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise ConfigError(f"--schedule {bad or ''} is unknown: use one of {', '.join(SCHEDULES)} or all")
        t = self.global_batch_tokens
        if not isinstance(t, int) or t < self.seq_len or t % self.seq_len:
            raise ConfigError(
                f"--global-batch-tokens={t!r} must be a positive multiple of --seq-len={self.seq_len} "
                f"(B = T/s sequences): use e.g. {max(1, (t or 0) // self.seq_len) * self.seq_len}"
            )
        for name in ("top", "max_simulations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be ≥ 1")
        if not self.slice_split or any(x not in ("equal", "equal-flop") for x in self.slice_split):
            raise ConfigError(f"slice_split={self.slice_split!r} must be a non-empty tuple of 'equal' and "
                              "'equal-flop': use --slice-split equal, equal-flop or auto (both)")
        if self.documents is not None and True in self.exchange:
            raise ConfigError("--doc-lengths prices packed documents, which run without the attention "
                              "exchange: use --exchange off (or leave it at auto)")
        for name in ("vocab_parallel", "exchange"):
            value = getattr(self, name)
            if not value or any(not isinstance(x, bool) for x in value):
                raise ConfigError(f"{name}={value!r} must be a non-empty tuple of booleans: use (False, True) "
                                  f"to try both, or --{name.replace('_', '-')} on/off")

    @property
    def global_batch(self) -> int:
        """B = T/s."""
        return self.global_batch_tokens // self.seq_len


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """One simulated configuration (numbers identical to `slimpipe simulate` with the same flags)."""

    schedule: str
    """Builder name."""
    tp: int
    """t."""
    cp: int
    """c."""
    pp: int
    """p."""
    dp: int
    """d."""
    ep: int
    """e."""
    slices: int
    """n."""
    vpp: int
    """v."""
    microbatches: int
    """m = B/d."""
    recompute: str
    """Recompute mode."""
    offload: float
    """α."""
    vocab_parallel: bool
    """Vocabulary layers sharded over t·p."""
    exchange: bool
    """Attention context exchange (§8) on, unclipped (`slimpipe simulate --attn-balance n`)."""
    slice_split: str
    """equal (token counts) or equal-flop slices (`slimpipe simulate --slice-split`)."""
    step_time_s: float
    """Simulated step time (pipeline + DP sync)."""
    tokens_per_s: float
    """Global tokens per second."""
    mfu: float
    """MFU of the executed FLOPs, 6N + 6·L·H·Q·T (causal attention as run)."""
    mfu_dense: float
    """MFU, dense PaLM/torchtitan 6N + 12·L·H·Q·T convention."""
    bubble_ratio: float
    """Idle fraction of pipeline rank-time."""
    peak_memory_gib: float
    """Highest per-GPU peak, GiB."""
    headroom_gib: float
    """HBM minus peak, GiB."""

    def layout(self) -> str:
        """``t4 c2 p16 d1 e1 n16 v5`` as in `slimpipe simulate`'s header."""
        return (f"t{self.tp} c{self.cp} p{self.pp} d{self.dp} e{self.ep} n{self.slices} v{self.vpp}")

    def simulate_flags(self) -> str:
        """The `slimpipe simulate` flags that reproduce this plan (model, seq-len, batch and GPU added)."""
        flags = (f"--schedule {self.schedule} --tp {self.tp} --cp {self.cp} --pp {self.pp} --dp {self.dp} "
                 f"--ep {self.ep} --slices {self.slices} --vpp {self.vpp} --recompute {self.recompute}")
        if self.offload:
            flags += f" --offload {self.offload:g}"
        if self.vocab_parallel:
            flags += " --vocab-parallel"
        if self.slice_split == "equal-flop" and self.schedule != "seq1f1b":  # seq1f1b's default
            flags += " --slice-split equal-flop"
        return flags + (f" --attn-balance {self.slices}" if self.exchange else "")

    def to_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    """Ranked plans and what the search did to find them."""

    plans: tuple[Plan, ...]
    """Best first (tokens/s, then lower peak memory)."""
    layouts: int
    """Structural configurations enumerated (before the memory pre-check)."""
    rejected: dict[str, int]
    """Why configurations were dropped: divisibility, warm-up, memory, offload bandwidth, schedule,
    exchange (``exchange=(True,)`` on a layout where it does not apply)."""
    candidates: int
    """Configurations that passed the memory pre-check (exchange variants counted separately)."""
    exchange_candidates: int
    """Of these, the ones with the attention context exchange on."""
    simulated: int
    """Full simulations run."""
    simulated_exchange: int
    """Of these, the ones with the exchange on (each costs ≈ 2–7× one without: pairing dry run)."""
    not_simulated: int
    """Candidates never simulated (their estimate could not enter the top K, or max_simulations)."""
    capped: bool
    """True when max_simulations, not the estimates, ended the search."""
    best_unsimulated_tps: float | None
    """Upper bound (from the step-time bound) on the tokens/s of any candidate left unsimulated."""
    smallest_rejected_peak_gib: float | None
    """Lowest peak among memory-rejected configurations (for the error message)."""
    wall_s: float
    """Seconds the search took."""

    @property
    def headroom_unsimulated(self) -> float:
        """How much faster than the best plan an unsimulated candidate could be at most (its bound), as a
        fraction; ≤ 0 means the best plan is provably the best of all candidates."""
        if self.best_unsimulated_tps is None or not self.plans:
            return 0.0
        return self.best_unsimulated_tps / self.plans[0].tokens_per_s - 1
