"""Checkpoints with torch.distributed.checkpoint (DCP), keyed by global parameter names.

Layout of a checkpoint root::

    latest                 text file naming the newest complete step directory
    step_000020/           DCP shards + .metadata + trainer_state.json
    step_000030.tmp/       a save in progress (ignored; removed by the next save)

A save writes into ``step_N.tmp`` and renames it to ``step_N`` only after every rank finished, then moves
``latest``; a crash mid-save leaves the previous checkpoint and pointer untouched. Because every key is a
global name ('layers.5.attn.wq.weight', optimizer state under the same names), a checkpoint written with one
pipeline layout loads into any other: each rank asks DCP for exactly the names it owns. The JSON beside the
shards lets the launcher check a checkpoint against the run before any process starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from slimpipe.config import ConfigError

__all__ = ["resolve_checkpoint", "check_checkpoint", "save_checkpoint", "load_checkpoint", "STATE_FILE"]

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def resolve_checkpoint(resume: str, checkpoint_dir: str) -> Path:
    """The step directory ``--resume`` names: 'latest' in checkpoint_dir, a root with 'latest', or a step dir."""
    path = Path(checkpoint_dir if resume == "latest" else resume)
    if (path / STATE_FILE).is_file():
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise ConfigError(
            f"--resume {resume}: no checkpoint at {path} (no '{LATEST}' pointer or {STATE_FILE}); "
            "give a checkpoint directory written by `slimpipe train --checkpoint-every N`"
        )
    step_dir = path / pointer.read_text().strip()
    if not (step_dir / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: '{LATEST}' points to {step_dir}, which is incomplete; resume from an older step_* directory")
    return step_dir


def check_checkpoint(step_dir: Path, *, model: dict[str, Any], seed: int, data_fingerprint: str,
                     steps: int) -> dict[str, Any]:
    """Read trainer_state.json and refuse a checkpoint that does not belong to this run."""
    try:
        state = json.loads((step_dir / STATE_FILE).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {step_dir}: unreadable checkpoint ({exc}); resume from another step_* directory") from None
    if not (step_dir / ".metadata").is_file():
        raise ConfigError(f"--resume {step_dir}: DCP .metadata missing (an interrupted copy?); resume from another step_* directory")
    if state.get("model") != model:
        diff = sorted(k for k in model if state.get("model", {}).get(k) != model[k])
        raise ConfigError(f"--resume {step_dir}: saved for another model (differs in {diff}); use the same --model")
    if state.get("seed") != seed:
        raise ConfigError(f"--resume {step_dir}: saved with --seed {state.get('seed')}, this run has --seed {seed}; use the same seed")
    if state.get("data_fingerprint") != data_fingerprint:
        raise ConfigError(f"--resume {step_dir}: saved on other data ({state.get('data')}); use the same --data")
    if step >= steps:
        raise ConfigError(f"--resume {step_dir}: already at step {step} ≥ --steps {steps}; raise --steps to continue")
    return state


# ----------------------------------------------------------------------------------------------------------
# torch side (imported lazily: DCP costs ~4 s to import)


def _optim_state(rt: Any, *, template: bool) -> dict[str, dict[str, Any]]:
    """AdamW state keyed by global parameter name; zeros of the right shape where none exists yet."""
    import torch

    if getattr(rt, "vocab_layout", None) is not None:  # vocab shards saved as full tensors (collective)
        from slimpipe.runtime.vocab_state import full_optim_state

        return full_optim_state(rt.vocab_layout, rt.optimizer, template=template)
    opt = rt.optimizer
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    out: dict[str, dict[str, Any]] = {}
    for name, p in rt.named_parameters():
        st = opt.state.get(p)
        if not st:
            if not template:
                continue  # a parameter that never had a gradient has no state to save
            step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            st = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        out[name] = dict(st)
    return out


def _all_parameters(rt: Any) -> list[tuple[str, Any]]:
    """Every (name, parameter) the optimizer holds, tied replicas of the local runtime included."""
    if hasattr(rt, "rank_parameters"):
        return [pair for r in range(rt.schedule.num_ranks) for pair in rt.rank_parameters(r)]
    return list(rt.named_parameters())


def _rng_state() -> dict[str, Any]:
    import torch

    # CPU generator only: the model has no dropout and the runtime seeds weights per parameter name, so
    # this is kept for user code that draws random numbers; device generators are not layout-portable.
    return {"torch": torch.get_rng_state()}


def save_checkpoint(rt: Any, root: str, step: int, meta: dict[str, Any], *, rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final step directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root_p = Path(root)
    final, tmp = _step_dir(root_p, step), Path(str(_step_dir(root_p, step)) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = {
        "model": rt.model_state_dict(),
        "optim": _optim_state(rt, template=False),
        "rng": _rng_state(),
        "train": {"step": step, "data_position": step},
    }
    dcp.save(sd, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step}, indent=1))
        if final.exists():  # a stale directory from an earlier, longer run in the same root
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = root_p / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root_p / LATEST)
        _prune(root_p, keep, final)
    dist.barrier()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Drop torn saves older than ``newest`` and all but the ``keep`` newest complete checkpoints."""
    for torn in root.glob("step_*.tmp"):
        if torn.name < newest.name:
            shutil.rmtree(torn, ignore_errors=True)
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(rt: Any, step_dir: Path) -> int:
    """Collective: load model, optimizer and RNG for this rank's parameters; returns the saved step."""
    import torch
    import torch.distributed.checkpoint as dcp

    model_sd = rt.model_state_dict()
    optim_sd = _optim_state(rt, template=True)
    sd: dict[str, Any] = {
        "model": model_sd,
        "optim": optim_sd,
        "rng": _rng_state(),
        "train": {"step": 0, "data_position": 0},
    }
    dcp.load(sd, checkpoint_id=str(step_dir))
    rt.load_model_state_dict(sd["model"])
    if getattr(rt, "vocab_layout", None) is not None:  # each rank keeps its rows of the full tensors
        from slimpipe.runtime.vocab_state import load_optim_state

        load_optim_state(rt.vocab_layout, rt.optimizer, sd["optim"])
    assigned: set[str] = set()
    for name, param in [] if getattr(rt, "vocab_layout", None) is not None else _all_parameters(rt):
        st = sd["optim"][name]
        # a tied replica (local runtime) gets its own copy: aliasing would update one state twice
        rt.optimizer.state[param] = {k: v.clone() for k, v in st.items()} if name in assigned else st
        assigned.add(name)
    torch.set_rng_state(sd["rng"]["torch"])
    return int(sd["train"]["step"])
