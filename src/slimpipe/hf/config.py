"""Hugging Face Llama checkpoints, torch-free: config.json ↔ ModelConfig, tensor names, safetensors headers.

Everything a run can get wrong about a checkpoint directory is found here, before a process starts and
before a byte of weights is read: a non-Llama or unsupported config, a missing or corrupt safetensors
file (its header is parsed and every tensor's byte range checked against the file size), a tensor
missing, of the wrong shape or of an unknown dtype. Each is a :class:`ConfigError` (one line, exit 2).

Name map (slimpipe global name ← Hugging Face name)::

    embed.weight                       model.embed_tokens.weight
    layers.<i>.attn_norm.weight        model.layers.<i>.input_layernorm.weight
    layers.<i>.attn.w{q,k,v,o}.weight  model.layers.<i>.self_attn.{q,k,v,o}_proj.weight
    layers.<i>.mlp_norm.weight         model.layers.<i>.post_attention_layernorm.weight
    layers.<i>.mlp.w1/w3/w2.weight     model.layers.<i>.mlp.gate/up/down_proj.weight
    norm.weight                        model.norm.weight
    head.weight                        lm_head.weight (absent when tied)

No permutation of q/k is needed: Hugging Face's Llama applies RoPE in the rotate-half layout (its
``rotate_half``, pairing dimension i with i + d/2), which is :func:`slimpipe.models.llama.apply_rope`'s;
tests/hf/test_hf_logits.py proves it on logits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimpipe.config import ConfigError, ModelConfig, RopeScaling

__all__ = [
    "HFTensor", "HFCheckpoint", "open_checkpoint", "model_from_hf", "hf_config_dict", "hf_name", "slimpipe_name",
    "expected_shapes", "read_safetensors_header", "SAFETENSORS_DTYPES",
]

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
"""Floating dtypes a weight may be stored in, with their sizes in bytes."""
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports stored; recomputed here


def hf_name(name: str) -> str:
    """slimpipe global parameter name → Hugging Face tensor name."""
    if name in _TOP:
        return _TOP[name]
    _, idx, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{idx}.{_LAYER[rest]}"


def slimpipe_name(name: str) -> str | None:
    """Hugging Face tensor name → slimpipe global name (None for a buffer slimpipe recomputes)."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_BACK:
        return f"layers.{parts[2]}.{_LAYER_BACK[parts[3]]}"
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    raise KeyError(name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every slimpipe global parameter name of ``cfg`` with its full shape."""
    h, f, out = cfg.hidden, cfg.ffn, {"embed.weight": (cfg.vocab_size, cfg.hidden), "norm.weight": (cfg.hidden,)}
    if not cfg.tie_embeddings:
        out["head.weight"] = (cfg.vocab_size, h)
    per = {"attn_norm.weight": (h,), "attn.wq.weight": (cfg.q_dim, h), "attn.wk.weight": (cfg.kv_dim, h),
           "attn.wv.weight": (cfg.kv_dim, h), "attn.wo.weight": (h, cfg.q_dim), "mlp_norm.weight": (h,),
           "mlp.w1.weight": (f, h), "mlp.w3.weight": (f, h), "mlp.w2.weight": (h, f)}
    for i in range(cfg.num_layers):
        out.update({f"layers.{i}.{k}": v for k, v in per.items()})
    return out


# ---- config.json ---------------------------------------------------------------------------------------


def _require(cfg: dict[str, Any], key: str, where: Path) -> Any:
    if key not in cfg:
        raise ConfigError(f"--init-from {where}: config.json has no '{key}'; give a Llama checkpoint directory")
    return cfg[key]


def _rope(cfg: dict[str, Any], where: Path) -> tuple[float, RopeScaling | None]:
    """(θ, scaling) from transformers ≥ 5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = dict(cfg.get("rope_scaling") or {}) or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(
            f"--init-from {where}: rope scaling type {kind!r} is not supported (linear, llama3 are); "
            "convert the checkpoint or drop the scaling"
        )
    try:
        extra = {} if kind == "linear" else dict(
            low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_positions=int(scaling["original_max_position_embeddings"]))
        return theta, RopeScaling(kind=kind, factor=float(scaling["factor"]), **extra)
    except KeyError as exc:
        raise ConfigError(f"--init-from {where}: rope scaling {kind!r} lacks {exc}; fix config.json") from None


def model_from_hf(cfg: dict[str, Any], where: Path) -> ModelConfig:
    """A Hugging Face LlamaConfig dict → ModelConfig; anything slimpipe's Llama cannot run is refused."""
    kind = cfg.get("model_type")
    if kind != "llama":
        arch = ",".join(cfg.get("architectures") or []) or "?"
        raise ConfigError(
            f"--init-from {where}: model_type {kind!r} ({arch}) is not supported: slimpipe loads Llama "
            "checkpoints (model_type 'llama')"
        )
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ConfigError(f"--init-from {where}: {key}={cfg[key]!r} is not supported (slimpipe's Llama has {key}={ok!r})")
    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    theta, scaling = _rope(cfg, where)
    return ModelConfig(
        name=where.name or "hf", num_layers=int(_require(cfg, "num_hidden_layers", where)), hidden=hidden,
        ffn=int(_require(cfg, "intermediate_size", where)), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(_require(cfg, "vocab_size", where)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )


def hf_config_dict(cfg: ModelConfig, *, dtype: str, eos_token_id: int | None = None) -> dict[str, Any]:
    """ModelConfig → a LlamaConfig dict (the classic ``rope_theta``/``rope_scaling`` keys, which every
    transformers version reads)."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": 131072, "torch_dtype": dtype,
        "initializer_range": 0.02, "use_cache": True,
    }
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            out["rope_scaling"].update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                                       original_max_position_embeddings=s.original_max_positions)
    return out


# ---- safetensors ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HFTensor:
    """Where one tensor lives: file, Hugging Face name, dtype and shape (from the header)."""

    file: Path
    hf_name: str
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, with every tensor's byte range checked against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} B)")
            header = json.loads(fh.read(n))
        data = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            width = SAFETENSORS_DTYPES.get(info["dtype"], 1)
            elems = 1
            for d in info["shape"]:
                elems *= d
            if not 0 <= lo <= hi <= data or hi - lo != elems * width:
                raise ValueError(f"tensor {name}: bytes [{lo}, {hi}) do not match its shape or the file")
        return header
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ConfigError(f"--init-from {path}: not a valid safetensors file ({exc}); re-download or re-export it") from None


@dataclass(frozen=True, slots=True)
class HFCheckpoint:
    """A checked Hugging Face Llama directory: its ModelConfig and where each slimpipe tensor lives."""

    path: Path
    """The directory."""
    model: ModelConfig
    """The mapped model."""
    tensors: dict[str, HFTensor]
    """slimpipe global name → its tensor in the files."""
    config: dict[str, Any]
    """config.json as read."""

    @property
    def num_bytes(self) -> int:
        """Bytes of weights on disk."""
        total = 0
        for t in self.tensors.values():
            n = SAFETENSORS_DTYPES[t.dtype]
            for d in t.shape:
                n *= d
            total += n
        return total


def _weight_files(path: Path) -> dict[str, Path]:
    """HF name → file, from model.safetensors.index.json or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: path / v for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--init-from {index}: unreadable index ({exc}); re-download or re-export it") from None
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(
            f"--init-from {path}: no model.safetensors or model.safetensors.index.json; give a directory "
            "saved by transformers' save_pretrained (safetensors weights)"
        )
    return {k: single for k in read_safetensors_header(single) if k != "__metadata__"}


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Check a Hugging Face Llama directory completely (config, headers, names, shapes, dtypes)."""
    root = Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--init-from {root}: no config.json; give a Hugging Face model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"--init-from {cfg_file}: not valid JSON ({exc})") from None
    model = model_from_hf(config, root)
    files = _weight_files(root)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    want = expected_shapes(model)
    tensors: dict[str, HFTensor] = {}
    for hf, file in files.items():
        info = headers[file].get(hf)
        if info is None:
            raise ConfigError(f"--init-from {root}: the index names {hf} in {file.name}, which lacks it; re-download")
        try:
            name = slimpipe_name(hf)
        except KeyError:
            raise ConfigError(f"--init-from {root}: unexpected tensor {hf}: not a plain Llama checkpoint") from None
        if name is None:
            continue
        if name not in want:
            raise ConfigError(f"--init-from {root}: tensor {hf} does not belong to a model with config.json's {model.num_layers} layers (tied={model.tie_embeddings})")
        shape = tuple(info["shape"])
        if shape != want[name]:
            raise ConfigError(f"--init-from {root}: {hf} has shape {list(shape)}, config.json implies {list(want[name])}; the files do not match the config")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConfigError(f"--init-from {root}: {hf} is stored as {info['dtype']}; only F64/F32/F16/BF16 weights load")
        tensors[name] = HFTensor(file=file, hf_name=hf, dtype=info["dtype"], shape=shape)
    missing = sorted(hf_name(n) for n in want if n not in tensors)
    if missing:
        raise ConfigError(f"--init-from {root}: {len(missing)} tensor(s) missing, e.g. {missing[0]}; the checkpoint is incomplete")
    return HFCheckpoint(path=root, model=model, tensors=tensors, config=config)
