"""GPU specs for the cost model: presets (h100, h800, h200, a100) and JSON files. Imports no torch.

Bandwidths are *achievable* bus bandwidths (what a ring collective or a p2p copy reaches), not datasheet
link rates, so a transfer of X bytes takes ``latency + X / bandwidth``. The peak FLOP/s is the dense bf16
datasheet figure (989 TFLOPS for H100/H800/H200 SXM, the convention MFU is quoted in); the cost model
multiplies it by an achievable fraction for GEMMs and another for attention kernels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from slimpipe.config import ConfigError

__all__ = ["Hardware", "HARDWARE_PRESETS", "load_hardware"]

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

    def __post_init__(self) -> None:
        for f in ("peak_flops", "hbm_bytes", "intra_node_bw", "inter_node_bw"):
            val = getattr(self, f)
            if not isinstance(val, (int, float)) or val <= 0:
                raise ConfigError(f"hardware.{f}={val!r} must be a positive number")
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
        return dataclasses.asdict(self)


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
    """A preset by name or a JSON file of Hardware fields (name defaults to the file stem)."""
    if name_or_path in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[name_or_path]
    if name_or_path.endswith(".json"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"--gpu {name_or_path}: no such file; give a preset or a JSON file path")
        try:
            fields = json.loads(path.read_text())
            return Hardware(**{"name": path.stem, **fields})
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"--gpu {name_or_path}: not a valid Hardware JSON ({exc})") from None
    raise ConfigError(
        f"--gpu {name_or_path!r} is unknown: use one of {sorted(HARDWARE_PRESETS)} or a .json file"
    )
