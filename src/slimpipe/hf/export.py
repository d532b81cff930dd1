"""A slimpipe training checkpoint (DCP, any layout) → a Hugging Face Llama directory.

Checkpoints are layout-free already (global names; vocabulary-parallel shards saved as full tensors), so
export reads the DCP metadata, loads the model tensors in groups of at most ``shard_bytes`` (one
single-process ``dcp.load`` per group: the host never holds the whole model plus its copy), renames them
and writes ``model-0000k-of-0000K.safetensors`` files, an index when there is more than one, and a
``config.json`` that ``transformers`` reads. Everything goes to ``OUT.partial`` first and is renamed when
complete; an existing OUT is refused before anything is read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.hf.config import expected_shapes, hf_config_dict, hf_name
from slimpipe.train.checkpoint import STATE_FILE

__all__ = ["ExportStats", "check_export", "export_checkpoint", "EXPORT_DTYPES"]

EXPORT_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ExportStats:
    """What an export wrote."""

    files: int
    tensors: int
    bytes_written: int
    seconds: float


def check_export(step_dir: Path, out: Path) -> tuple[ModelConfig, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(model, name → (shape, stored dtype)) of a checkpoint, or a ConfigError; touches nothing."""
    from torch.distributed.checkpoint import FileSystemReader

    if out.exists():
        raise ConfigError(f"--out {out} exists: give a new directory (export never overwrites)")
    try:
        model = ModelConfig(**json.loads((step_dir / STATE_FILE).read_text())["model"])
        meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--checkpoint {step_dir}: unreadable ({exc}); give a step directory of `slimpipe train`") from None
    if model.num_experts != 1:
        raise ConfigError(f"--checkpoint {step_dir}: a MoE model (num_experts={model.num_experts}) has no Llama layout to export to")
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in expected_shapes(model).items():
        entry = meta.get(f"model.{name}")
        if entry is None or tuple(entry.size) != shape:
            got = None if entry is None else list(entry.size)
            raise ConfigError(f"--checkpoint {step_dir}: model.{name} is {got}, the model needs {list(shape)}; the checkpoint is damaged")
        stored[name] = (shape, entry.properties.dtype)
    return model, stored


def _groups(stored: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype | None,
            shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shape, dt) in stored.items():
        n = torch.Size(shape).numel() * (dtype or dt).itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def export_checkpoint(step_dir: Path, out: Path, *, dtype: str = "keep", shard_bytes: int = 2 << 30) -> ExportStats:
    """Write ``out`` (a new directory) from the DCP checkpoint in ``step_dir``."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    model, stored = check_export(step_dir, out)
    cast = EXPORT_DTYPES[dtype]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    groups = _groups(stored, cast, shard_bytes)
    weight_map: dict[str, str] = {}
    written = 0
    for k, names in enumerate(groups):
        sd = {n: torch.empty(stored[n][0], dtype=stored[n][1]) for n in names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": sd}, checkpoint_id=str(step_dir), no_dist=True)
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {hf_name(n): (t if cast is None else t.to(cast)).contiguous() for n, t in sd.items()}
        save_file(tensors, str(partial / fname), metadata={"format": "pt"})
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({h: fname for h in tensors})
        del sd, tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    first = next(iter(stored.values()))[1] if cast is None else cast
    config = hf_config_dict(model, dtype=str(first).removeprefix("torch."))
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.rename(partial, out)
    return ExportStats(files=len(groups), tensors=len(weight_map), bytes_written=written,
                       seconds=time.perf_counter() - t0)
