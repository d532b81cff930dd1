"""Checkpoints with torch.distributed.checkpoint (DCP), keyed by global parameter names.

Layout of a checkpoint root::

    latest                 text file naming the newest complete step directory
    step_000020/           DCP shards + .metadata + trainer_state.json + checksums.json
    step_000030.tmp/       a save in progress (ignored; removed by the next save)

A save writes into ``step_N.tmp`` and renames it to ``step_N`` only after every rank finished, then moves
``latest``; a crash mid-save leaves the previous checkpoint and pointer untouched, and a save that fails
(disk full) is removed and reported on every rank at once (SaveFailed). Every file's SHA-256 is recorded
(train/manifest.py) and checked before a resume loads anything. Rotation never deletes the newest
checkpoint taken at a finite loss. Because every key is a
global name ('layers.5.attn.wq.weight', optimizer state under the same names), a checkpoint written with one
pipeline layout loads into any other: each rank asks DCP for exactly the names it owns. The JSON beside the
shards lets the launcher check a checkpoint against the run before any process starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.train.exits import BadCheckpoint, SaveFailed
from slimpipe.train.manifest import (
    content_problems, file_digest, read_manifest, saved_files, share, size_problems, write_manifest,
)

__all__ = ["resolve_checkpoint", "check_checkpoint", "checkpoint_model", "save_checkpoint", "load_checkpoint",
           "load_model_weights", "STATE_FILE", "LATEST", "last_finite_checkpoint"]

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_NAME = re.compile(r"step_\d{6,}")
_PREFLIGHT_HASH_BYTES = 16 << 20  # files up to this size are hashed before launch, larger ones by the ranks


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def resolve_checkpoint(resume: str, checkpoint_dir: str, *, flag: str = "--resume") -> Path:
    """The step directory ``--resume`` names: 'latest' in checkpoint_dir, a root with 'latest', or a step dir."""
    path = Path(checkpoint_dir if resume == "latest" else resume)
    if (path / STATE_FILE).is_file():
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise ConfigError(
            f"{flag} {resume}: no checkpoint at {path} (no '{LATEST}' pointer or {STATE_FILE}); "
            "give a checkpoint directory written by `slimpipe train --checkpoint-every N`"
        )
    name = pointer.read_bytes()[:256].decode("utf-8", errors="replace").strip()
    if not _STEP_NAME.fullmatch(name):
        raise ConfigError(f"--resume {resume}: {pointer} does not name a step directory (it holds "
                          f"{name[:40]!r}); resume from a step_* directory inside it")
    step_dir = path / name
    if not (step_dir / STATE_FILE).is_file():
        raise ConfigError(f"{flag} {resume}: '{LATEST}' points to {step_dir}, which is incomplete; resume from an older step_* directory")
    return step_dir


def last_finite_checkpoint(root: str) -> Path | None:
    """The newest complete step directory under ``root`` whose loss was finite, or None."""
    done = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return next((p for p in reversed(done) if (p / STATE_FILE).is_file() and _finite(p)), None)


def check_checkpoint(step_dir: Path, *, model: dict[str, Any], seed: int, data_fingerprint: str,
                     steps: int, data_name: str = "") -> dict[str, Any]:
    """Read trainer_state.json and refuse a checkpoint that does not belong to this run or does not verify
    (sizes of every file, contents of the small ones; the ranks hash the shards before loading)."""
    other = "resume from another step_* directory (`slimpipe checkpoint verify` checks them all)"
    files = read_manifest(step_dir)
    if files is not None:
        small = [n for n, e in files.items() if int(e["bytes"]) <= _PREFLIGHT_HASH_BYTES]
        problems = size_problems(step_dir, files) or content_problems(step_dir, files, small)
        if problems:
            raise ConfigError(f"--resume {step_dir}: {problems[0]}; {other}")
    try:
        state = json.loads((step_dir / STATE_FILE).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {step_dir}: unreadable checkpoint ({type(exc).__name__}); "
                          f"{other}") from None
    if not (step_dir / ".metadata").is_file():
        raise ConfigError(f"--resume {step_dir}: DCP .metadata missing (an interrupted copy?); {other}")
    if state.get("model") != model:
        diff = sorted(k for k in model if state.get("model", {}).get(k) != model[k])
        raise ConfigError(f"--resume {step_dir}: saved for another model (differs in {diff}); use the same --model")
    if state.get("seed") != seed:
        raise ConfigError(f"--resume {step_dir}: saved with --seed {state.get('seed')}, this run has --seed {seed}; use the same seed")
    if state.get("data_fingerprint") != data_fingerprint:
        if data_name and state.get("data") == data_name:
            raise ConfigError(f"--resume {step_dir}: the contents of {data_name} changed since the save "
                              f"(fingerprint {state.get('data_fingerprint')} then, {data_fingerprint} now): "
                              "restore the file the run trained on, or start a new run without --resume")
        raise ConfigError(f"--resume {step_dir}: saved on other data ({state.get('data')}); use the same --data")
    if step >= steps:
        raise ConfigError(f"--resume {step_dir}: already at step {step} ≥ --steps {steps}; raise --steps to continue")
    return state


def checkpoint_model(step_dir: Path) -> ModelConfig:
    """The model a checkpoint was saved for (evaluation and export build it from here)."""
    try:
        return ModelConfig(**json.loads((step_dir / STATE_FILE).read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {step_dir}: unreadable {STATE_FILE} ({exc}); give a checkpoint of `slimpipe train`") from None


# ----------------------------------------------------------------------------------------------------------
# torch side (imported lazily: DCP costs ~4 s to import)


def _optim_state(rt: Any, *, template: bool) -> dict[str, dict[str, Any]]:
    """AdamW state keyed by global parameter name; zeros of the right shape where none exists yet."""
    import torch

    tp = getattr(rt, "tp_layout", None)  # tensor-parallel pieces as DTensors (runtime/tp_state.py)
    if getattr(rt, "vocab_layout", None) is not None:  # vocab shards saved as full tensors (collective)
        from slimpipe.runtime.vocab_state import full_optim_state

        out = full_optim_state(rt.vocab_layout, rt.optimizer, template=template)
        return out if tp is None else tp.optim_state(out)
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
    return out if tp is None else tp.optim_state(out)


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


def save_checkpoint(rt: Any, root: str, step: int, meta: dict[str, Any], *, rank: int, keep: int,
                    loss: float | None = None, finite: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final step directory; raises SaveFailed on every rank
    (the torn save removed, ``latest`` untouched) when any rank's write fails. ``loss`` and ``finite`` (loss
    and grad norm of the step were finite) go into trainer_state.json: rotation keeps the newest checkpoint
    taken at a finite step."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from slimpipe.train.faults import fault_hook

    root_p = Path(root)
    final, tmp = _step_dir(root_p, step), Path(str(_step_dir(root_p, step)) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
    error = _agree(_attempt(lambda: tmp.mkdir(parents=True)) if rank == 0 else None)
    if error is None:
        sd = {
            "model": rt.model_state_dict(),
            "optim": _optim_state(rt, template=False),
            "rng": _rng_state(),
            "train": {"step": step, "data_position": step},
        }
        error = _agree(_attempt(lambda: dcp.save(sd, checkpoint_id=str(tmp))))
    digests: dict[str, tuple[int, str]] = {}
    if error is None:  # every rank hashes a share of the shards (DCP's .metadata exists once save returns)
        fault_hook(rank, f"save{step}")  # TEST HOOK: vanish with the shards written, nothing renamed
        mine = share(saved_files(tmp), rank, dist.get_world_size())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {n: file_digest(tmp / n) for n in mine})
        digests = {k: v for part in gathered for k, v in part.items()}
        state = {**meta, "step": step}
        error = _agree(_attempt(lambda: _publish(root_p, tmp, final, state, digests, keep, loss, finite))
                       if rank == 0 else None)
    if error is not None:
        free = _free(root_p)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = (root_p / LATEST).read_text().strip() if (root_p / LATEST).is_file() else "none yet"
        raise SaveFailed(f"checkpoint save at step {step} failed: {error}{free}; the previous checkpoint "
                         f"({previous}) is intact: free space in {root_p} or set --checkpoint-dir, then "
                         "--resume")
    return final


def _free(root: Path) -> str:
    """' (N MiB free of M MiB)' for the file system under ``root`` (torch's writer may hide ENOSPC)."""
    try:
        usage = shutil.disk_usage(root)
    except OSError:
        return ""
    return f" ({usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.0f} MiB on that disk)"


def _attempt(fn: Any) -> str | None:
    """Run ``fn``; its failure as one line (None on success)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        fn()
        return None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - signals (Stopped) pass through
        wrapped = [e for e, _ in getattr(exc, "failures", {}).values()]  # DCP wraps even a BaseException
        stop = next((e for e in wrapped if not isinstance(e, Exception)), None)
        if stop is not None:
            raise stop from None
        return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    """The failure's root in one line. DCP gathers every rank's exception into a CheckpointException
    (``failures``: rank -> (exception, stack)): an OSError among them (No space left on device) says what
    happened, the others are its echoes."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        ranked = sorted(failures.items(), key=lambda kv: not isinstance(kv[1][0], OSError))
        rank, (inner, _) = ranked[0]
        return f"rank {rank}: {_one_line(inner)}"
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _agree(error: str | None) -> str | None:
    """Collective: the first rank's error, on every rank (so all raise together or none does)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return next((e for e in gathered if e is not None), None)


def _publish(root: Path, tmp: Path, final: Path, state: dict[str, Any], digests: dict[str, tuple[int, str]],
             keep: int, loss: float | None, finite: bool) -> None:
    """Rank 0: trainer state and checksums, rename into place, move ``latest``, rotate."""
    loss = loss if loss is not None and math.isfinite(loss) else None
    (tmp / STATE_FILE).write_text(json.dumps({**state, "loss": loss, "finite": finite}, indent=1))
    write_manifest(tmp, {**digests, STATE_FILE: file_digest(tmp / STATE_FILE)})
    if final.exists():  # a stale directory from an earlier, longer run in the same root
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = root / (LATEST + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    _prune(root, keep, final)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Drop torn saves older than ``newest`` and all but the ``keep`` newest complete checkpoints, never
    the newest one whose loss was finite (a diverged run keeps the checkpoint to go back to)."""
    for torn in root.glob("step_*.tmp"):
        if torn.name < newest.name:
            shutil.rmtree(torn, ignore_errors=True)
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    last_finite = next((p for p in reversed(done) if _finite(p)), None)
    for old in done[:-keep]:
        if old not in (newest, last_finite):
            shutil.rmtree(old, ignore_errors=True)


def _finite(step_dir: Path) -> bool:
    try:
        return json.loads((step_dir / STATE_FILE).read_text()).get("finite", True) is not False
    except (OSError, ValueError, AttributeError):
        return False


def load_model_weights(rt: Any, step_dir: Path) -> None:
    """Collective: the model weights only (evaluation); any layout, like load_checkpoint."""
    import torch.distributed.checkpoint as dcp

    sd = {"model": rt.model_state_dict()}
    dcp.load(sd, checkpoint_id=str(step_dir))
    rt.load_model_state_dict(sd["model"])


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
    _verify_shards(step_dir)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(sd, checkpoint_id=str(step_dir))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - verified (or older) yet unloadable
        raise BadCheckpoint(f"--resume {step_dir}: DCP cannot load it ({_one_line(exc)}); resume "
                            "from another step_* directory") from exc
    if getattr(rt, "tp_layout", None) is not None:  # DTensors filled with this rank's piece → pieces
        from slimpipe.runtime.tp_state import local_tensors

        sd["optim"] = local_tensors(sd["optim"])
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


def _verify_shards(step_dir: Path) -> None:
    """Collective: every rank hashes a share of the checkpoint's files against checksums.json; any mismatch
    is BadCheckpoint on every rank, naming the file."""
    import torch.distributed as dist

    files = read_manifest(step_dir)
    if files is None:  # saved before checksums were recorded: nothing to compare against
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = content_problems(step_dir, files, share(sorted(files), rank, world))
    gathered: list[Any] = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    problems = [p for part in gathered for p in part]
    if problems:
        raise BadCheckpoint(f"--resume {step_dir}: {problems[0]}; resume from another step_* directory "
                            "(`slimpipe checkpoint verify` checks them all)")
