"""GPU specs for the cost model: presets (h100, h800, h200, a100), JSON files and measured profiles.

Imports no torch. A *profile* (written by ``slimpipe calibrate``) is a Hardware whose peak, efficiencies and
links were measured on one machine, plus a :class:`CostProfile` of fitted per-kernel times that
AnalyticCost uses instead of ``peak × efficiency`` (see docs/calibrate.md).

Bandwidths are *achievable* bus bandwidths (what a ring collective or a p2p copy reaches), not datasheet
link rates, so a transfer of X bytes takes ``latency + X / bandwidth``. The peak FLOP/s is the dense bf16
datasheet figure (989 TFLOPS for H100/H800/H200 SXM, the convention MFU is quoted in); the cost model
multiplies it by an achievable fraction for GEMMs and another for attention kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from slimpipe.config import ConfigError

__all__ = [
    "Hardware", "HARDWARE_PRESETS", "load_hardware", "load_profile", "CostProfile", "LinearTime",
    "GemmProfile", "AttentionTime", "ActivationFootprint", "PROFILE_FORMAT", "elementwise_width",
    "profile_from_dict", "log_interp",
]

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    """One GPU type and the links between GPUs of a cluster built from it."""

    name: str = "custom"
    """Preset or file name, for reports."""
    peak_flops: float
    """Dense bf16 peak FLOP/s per GPU (datasheet; the MFU denominator)."""
    gemm_efficiency: float = 0.75
    """Fraction of peak that large bf16 GEMMs reach (linear layers)."""
    attention_efficiency: float = 0.6
    """Fraction of peak that fused causal attention kernels reach (flash attention forward/backward)."""
    hbm_bytes: float
    """Device memory per GPU in bytes (reports flag plans whose peak exceeds it)."""
    gpus_per_node: int = 8
    """GPUs joined by the intra-node fabric (NVLink/NVSwitch)."""
    intra_node_bw: float
    """Achievable per-GPU bandwidth inside a node, bytes/s (collectives and p2p)."""
    inter_node_bw: float
    """Achievable per-GPU bandwidth between nodes, bytes/s (one NIC per GPU)."""
    p2p_latency_s: float = 10e-6
    """Fixed cost of one point-to-point message or collective step, seconds."""
    profile: CostProfile | None = None
    """Fitted kernel times from ``slimpipe calibrate``; None = the FLOP/efficiency model of the presets."""

    def __post_init__(self) -> None:
        for f in ("peak_flops", "hbm_bytes", "intra_node_bw", "inter_node_bw"):
            val = getattr(self, f)
            if not isinstance(val, (int, float)) or not 0 < val < math.inf:
                raise ConfigError(f"hardware.{f}={val!r} must be a positive finite number")
        for f in ("gemm_efficiency", "attention_efficiency"):
            val = getattr(self, f)
            if not 0 < val <= 1:
                raise ConfigError(f"hardware.{f}={val!r} must be in (0, 1]: it is a fraction of peak")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ConfigError(f"hardware.gpus_per_node={self.gpus_per_node!r} must be a positive integer")
        if self.p2p_latency_s < 0:
            raise ConfigError(f"hardware.p2p_latency_s={self.p2p_latency_s!r} must be ≥ 0")

    def link_bw(self, span: int) -> float:
        """Bandwidth of a group whose members are ``span`` consecutive GPU ids apart at most."""
        return self.intra_node_bw if span <= self.gpus_per_node else self.inter_node_bw

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able fields (a profile is nested as a dict; presets have ``profile: None``)."""
        return dataclasses.asdict(self)


PROFILE_FORMAT = "slimpipe-profile/1"
"""Value of the ``format`` key of a profile JSON."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LinearTime:
    """A fitted time ``fixed_s + per_item_s · x``; each use says what x counts (FLOPs, tokens, elements)."""

    fixed_s: float
    """Intercept: the cost of issuing the work at all (dispatch, kernel launch), seconds."""
    per_item_s: float
    """Seconds per item of x."""

    def __call__(self, x: float) -> float:
        return self.fixed_s + self.per_item_s * x


@dataclass(frozen=True, kw_only=True, slots=True)
class GemmProfile:
    """Measured time of one linear layer ``y = x·Wᵀ``, x (T, in), W (out, in), at the calibrated dtype."""

    in_features: int
    """in: columns of W."""
    out_features: int
    """out: rows of W."""
    fwd: LinearTime
    """Forward, x = FLOPs = 2·T·in·out."""
    bwd: LinearTime
    """Backward (dX and dW), x = FLOPs = 4·T·in·out."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionTime:
    """Sliced causal attention of T queries after a K/V prefix of P tokens (one layer, one direction).

    ``t = fixed_s + prefix_s·4q·T·P + diagonal_s·2q·T²`` where the diagonal coefficient is
    ``diagonal_s`` for the first slice (P = 0, causal kernel) and ``masked_diagonal_s`` otherwise (a
    kernel with an explicit mask may compute the whole T×T block), q = heads·head_dim. Where
    ``diagonal_curve`` is measured it replaces ``diagonal_s`` at P = 0: a CPU's causal kernel runs
    1.7× faster per FLOP at T = 4096 than at T = 512 (block sizes), which one coefficient cannot follow.
    Where ``prefix_curve`` is measured too, a slice after a prefix is priced as the runtime runs it (two
    fused calls, runtime/attention.py): its own causal block on the P = 0 curve, plus the prefix block and
    the log-sum-exp merge from the curve at T — one ``prefix_s`` over-predicted 1024-token slices after
    3072 tokens 1.13–1.16× and under-predicted 64-token ones 0.77× (BENCHMARKS "Simulator validation", F).
    """

    fixed_s: float
    """Intercept, seconds."""
    prefix_s: float
    """Seconds per FLOP of queries × prefix keys (4·q·T·P FLOPs)."""
    diagonal_s: float
    """Seconds per FLOP of the causal T×T block when P = 0 (2·q·T² FLOPs)."""
    masked_diagonal_s: float
    """Seconds per FLOP of the causal T×T block when P > 0."""
    diagonal_curve: tuple[tuple[float, float], ...] = ()
    """(T, seconds per FLOP of the causal T×T block at P = 0) at measured T, ascending; interpolated
    linearly in log T, held flat outside. Empty: ``diagonal_s`` (presets, older profiles)."""
    prefix_curve: tuple[tuple[float, float, float], ...] = ()
    """(T, seconds of the prefix block's fixed work and the merge, seconds per FLOP of queries × prefix
    keys) at measured T with P > 0, ascending; interpolated linearly in log T, held flat outside. Needs
    ``diagonal_curve``. Empty: ``prefix_s`` and ``masked_diagonal_s`` (presets, older profiles)."""

    def __call__(self, q_dim: float, tokens: float, prefix: float) -> float:
        return self.at_pairs(q_dim, tokens * prefix, tokens * tokens / 2, first=prefix <= 0)

    def at_pairs(self, q_dim: float, prefix_pairs: float, diagonal_pairs: float, *, first: bool) -> float:
        """The same from (query, key) pair counts: ``prefix_pairs`` unmasked, ``diagonal_pairs`` causal
        (T²/2 for one causal block; packed documents: Σ L²/2 over the slice's documents). The P = 0
        curve is read at the block's side √(2·pairs) (one causal block: T)."""
        side = math.sqrt(2 * diagonal_pairs)
        if not first and self.prefix_curve and self.diagonal_curve:
            merge = log_interp(tuple((t, m) for t, m, _ in self.prefix_curve), side)
            rate = log_interp(tuple((t, r) for t, _, r in self.prefix_curve), side)
            diag = log_interp(self.diagonal_curve, side)
            return self.fixed_s + merge + rate * 4 * q_dim * prefix_pairs + diag * 4 * q_dim * diagonal_pairs
        if not first:
            diag = self.masked_diagonal_s
        elif self.diagonal_curve:
            diag = log_interp(self.diagonal_curve, side)
        else:
            diag = self.diagonal_s
        return self.fixed_s + self.prefix_s * 4 * q_dim * prefix_pairs + diag * 4 * q_dim * diagonal_pairs


def log_interp(curve: tuple[tuple[float, float], ...], x: float) -> float:
    """y at x on a piecewise-linear curve in log x (flat beyond its ends)."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return curve[-1][1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ActivationFootprint:
    """Bytes the slimpipe runtime keeps per token, from its own accounting, at the calibrated dtype."""

    per_layer: float
    """Saved-for-backward bytes per token per layer (K/V buffers excluded)."""
    first_stage: float
    """Extra saved bytes per token of a unit of the stage holding the embedding."""
    middle_stage: float
    """Extra saved bytes per token of a unit of a stage with neither embedding nor head (RoPE tables…)."""
    last_stage: float
    """Extra saved bytes per token of a unit of the stage holding norm, head and loss (logits…)."""
    kv_per_layer: float
    """K + V block bytes per token per layer (2·d_kv·dtype bytes; one block per in-flight slice)."""


def elementwise_width(hidden: int, q_dim: int, kv_dim: int, ffn: int) -> int:
    """Elements per token per layer touched by the non-GEMM, non-attention ops of a Llama block.

    Two RMSNorms and two residual adds (4h), RoPE on q and k (q + d_kv), the SwiGLU gate (f). Used only
    to scale a profile's elementwise cost to another model width.
    """
    return 4 * hidden + q_dim + kv_dim + ffn


@dataclass(frozen=True, kw_only=True, slots=True)
class CostProfile:
    """What ``slimpipe calibrate`` fitted; AnalyticCost turns it into per-slice F/B times."""

    device: str
    """``cpu`` or ``cuda``."""
    dtype: str
    """Calibrated dtype (``float32`` on CPU, ``bfloat16`` on CUDA)."""
    dtype_bytes: int
    """Bytes per element of that dtype (p2p activation size)."""
    threads: int
    """torch intra-op threads during calibration (CPU)."""
    model: str
    """Model whose layer shapes were measured."""
    model_width: int
    """elementwise_width of that model."""
    gemms: tuple[GemmProfile, ...]
    """The calibrated model's linear shapes."""
    gemm_fwd: LinearTime
    """Any other shape, forward: fitted over all measured shapes, x = FLOPs."""
    gemm_bwd: LinearTime
    """Any other shape, backward, x = FLOPs."""
    attn_fwd: AttentionTime
    """Sliced causal attention, forward."""
    attn_bwd: AttentionTime
    """Sliced causal attention, backward."""
    elementwise_fwd: LinearTime
    """Norms, RoPE, SwiGLU gate, residuals of one layer, forward; x = tokens · elementwise_width."""
    elementwise_bwd: LinearTime
    """The same, backward."""
    embed_fwd: LinearTime
    """Embedding lookup, x = tokens · hidden."""
    embed_bwd: LinearTime
    """Embedding gradient, x = tokens · hidden."""
    loss_fwd: LinearTime
    """Final norm + cross-entropy beyond the head GEMM, x = tokens · vocab."""
    loss_bwd: LinearTime
    """The same, backward."""
    compose_fwd: float
    """κ: measured runtime forward of a unit ÷ the sum of its kernels (caches, allocator, autograd)."""
    compose_bwd: float
    """κ for the backward."""
    action_fwd_s: float
    """Per-action overhead of a forward unit in the runtime (executor, hooks, K/V store), seconds."""
    action_bwd_s: float
    """Per-action overhead of a backward unit, seconds."""
    p2p_latency_s: float
    """Measured one-way latency between two processes (CUDA: device-to-device copy, a stand-in)."""
    p2p_bandwidth: float
    """Measured bytes/s of the same transfer."""
    footprint: ActivationFootprint | None = None
    """Runtime activation bytes per token (None if not measured)."""
    p2p_send_s: float = 0.0
    """Sender's rank time per p2p message (posting the isend), measured while both ranks compute; 0 where
    not measured (CUDA, profiles written before it was)."""
    p2p_recv_s: float = 0.0
    """Receiver's rank time per p2p message sent before its receive was posted: gloo's rendezvous (the
    receiver's ready notice, the busy sender's progress thread answering, the copy); 0 where not
    measured. With the send cost it is charged on the ranks, and the transfer keeps only the rest of the
    one-way latency (LogP: latency = send overhead + wire + receive overhead)."""
    tp_latency_s: float = 0.0
    """Per-step latency of a TP ring collective (sequence-parallel all-gather / reduce-scatter, fitted
    over T = 2 and 4); 0 where not measured: the simulator then rings over the p2p link."""
    tp_bandwidth: float = 0.0
    """Bytes/s of the same ring (bytes·(T−1)/T per collective); 0 where not measured."""
    action_gap_s: float = 0.0
    """Executor time between two actions (its loop, the trace, the activation sampling after every
    action): a step's span minus its actions' wall times, per action, in the 2-rank executor run; charged
    to every F, B, SEND and RECV. 0 where not measured (CUDA, profiles written before it was)."""
    compose_curve_fwd: tuple[tuple[float, float], ...] = ()
    """(kernel seconds of one layer's forward, κ) at the unit sizes of the 2-rank executor run, ascending;
    interpolated linearly in log seconds, flat beyond its ends. It replaces ``compose_fwd`` for the
    layers' kernels: on a CPU a unit of 64 tokens takes more per kernel second than one of 1024 (caches,
    the allocator, autograd's fixed work per op), which one factor cannot follow. Empty: ``compose_fwd``
    (presets, CUDA, older profiles)."""
    compose_curve_bwd: tuple[tuple[float, float], ...] = ()
    """The same for the backward."""

    def compose(self, forward: bool, layer_kernel_s: float) -> float:
        """κ for one layer whose kernels take ``layer_kernel_s`` (the curve where measured, else the factor)."""
        curve = self.compose_curve_fwd if forward else self.compose_curve_bwd
        if curve:
            return log_interp(curve, layer_kernel_s)
        return self.compose_fwd if forward else self.compose_bwd

    def gemm(self, in_features: int, out_features: int) -> GemmProfile | None:
        """The measured shape, if calibrated."""
        for g in self.gemms:
            if (g.in_features, g.out_features) == (in_features, out_features):
                return g
        return None


HARDWARE_PRESETS: dict[str, Hardware] = {
    # NVLink4 900 GB/s bidirectional (~360 GB/s achieved bus bw); 8×400 Gb/s NICs per node (~45 GB/s).
    "h100": Hardware(name="h100", peak_flops=989e12, hbm_bytes=80 * GIB, intra_node_bw=360e9,
                     inter_node_bw=45e9),
    # Export variant: same compute, NVLink cut to 400 GB/s bidirectional (~160 GB/s achieved).
    "h800": Hardware(name="h800", peak_flops=989e12, hbm_bytes=80 * GIB, intra_node_bw=160e9,
                     inter_node_bw=45e9),
    # H100 compute with 141 GB HBM3e (about 139 GiB usable is what torch reports).
    "h200": Hardware(name="h200", peak_flops=989e12, hbm_bytes=141e9, intra_node_bw=360e9,
                     inter_node_bw=45e9),
    # NVLink3 600 GB/s bidirectional (~240 GB/s achieved); 200 Gb/s HDR per GPU (~22 GB/s).
    "a100": Hardware(name="a100", peak_flops=312e12, gemm_efficiency=0.7, attention_efficiency=0.55,
                     hbm_bytes=80 * GIB, intra_node_bw=240e9, inter_node_bw=22e9),
}


def load_hardware(name_or_path: str) -> Hardware:
    """A preset by name, a JSON file of Hardware fields (name defaults to the file stem), or a profile."""
    if name_or_path in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[name_or_path]
    if name_or_path.endswith(".json"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"--gpu {name_or_path}: no such file; give a preset or a JSON file path")
        try:
            fields = json.loads(path.read_text())
            if isinstance(fields, dict) and fields.get("format") == PROFILE_FORMAT:
                return profile_from_dict(fields, default_name=path.stem, source=name_or_path)
            return Hardware(**{"name": path.stem, **fields})
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"--gpu {name_or_path}: not a valid Hardware JSON ({exc})") from None
    raise ConfigError(
        f"--gpu {name_or_path!r} is unknown: use one of {sorted(HARDWARE_PRESETS)} or a .json file"
    )


def load_profile(path: str) -> Hardware:
    """A profile JSON written by ``slimpipe calibrate``: measured Hardware with its CostProfile attached."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--profile {path}: no such file; run `slimpipe calibrate -o {path}` first")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--profile {path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"--profile {path}: not a slimpipe profile (format must be {PROFILE_FORMAT!r}); "
                          "write one with `slimpipe calibrate`")
    return profile_from_dict(doc, default_name=p.stem, source=path)


def _linear(d: dict) -> LinearTime:
    return LinearTime(fixed_s=float(d["fixed_s"]), per_item_s=float(d["per_item_s"]))


def profile_from_dict(doc: dict, *, default_name: str, source: str) -> Hardware:
    """Hardware(+CostProfile) from the ``hardware`` and ``profile`` objects of a profile document."""
    try:
        prof = dict(doc["profile"])
        for key in ("gemm_fwd", "gemm_bwd", "elementwise_fwd", "elementwise_bwd", "embed_fwd", "embed_bwd",
                    "loss_fwd", "loss_bwd"):
            prof[key] = _linear(prof[key])
        for key in ("attn_fwd", "attn_bwd"):
            curve = tuple((float(t), float(y)) for t, y in prof[key].get("diagonal_curve", ()))
            pre = tuple((float(t), float(m), float(r)) for t, m, r in prof[key].get("prefix_curve", ()))
            prof[key] = AttentionTime(**{**prof[key], "diagonal_curve": curve, "prefix_curve": pre})
        prof["gemms"] = tuple(
            GemmProfile(in_features=g["in_features"], out_features=g["out_features"], fwd=_linear(g["fwd"]),
                        bwd=_linear(g["bwd"])) for g in prof["gemms"])
        for key in ("compose_curve_fwd", "compose_curve_bwd"):
            prof[key] = tuple((float(x), float(y)) for x, y in prof.get(key, ()))
        if prof.get("footprint") is not None:
            prof["footprint"] = ActivationFootprint(**prof["footprint"])
        profile = CostProfile(**prof)
        fields = {"name": default_name, **doc["hardware"], "profile": profile}
        hardware = Hardware(**fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: not a valid slimpipe profile ({type(exc).__name__}: {exc}); "
                          "recreate it with `slimpipe calibrate`") from None
    bad = _bad_number(profile, "profile")
    if bad:
        raise ConfigError(f"{source}: {bad}: a measured time, rate or size cannot be negative or non-finite; "
                          "recreate the profile with `slimpipe calibrate`")
    return hardware


def _bad_number(value: object, where: str) -> str | None:
    """The first negative or non-finite number in a profile (times, coefficients, bandwidths, bytes), or
    None. κ and the p2p bandwidth divide or scale every time, so they must also be nonzero."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            bad = _bad_number(getattr(value, f.name), f"{where}.{f.name}")
            if bad:
                return bad
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            bad = _bad_number(item, f"{where}[{i}]")
            if bad:
                return bad
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        positive = where.rsplit(".", 1)[-1] in ("compose_fwd", "compose_bwd", "p2p_bandwidth")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            return f"{where}={value!r}"
    return None
