"""Every check a run can fail before a process starts, each a ConfigError with a one-line fix. No torch.

``preflight`` resolves the config into what the ranks need (model, compute-only schedule, loaded data,
checkpoint to resume from) so that a bad flag costs milliseconds, not a process group.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig, load_model
from slimpipe.outputs import check_output_file, writable_dir
from slimpipe.rules import check_exchange, check_layout
from slimpipe.schedule.actions import Schedule
from slimpipe.hf.config import HFCheckpoint, open_checkpoint
from slimpipe.train.checkpoint import check_checkpoint, checkpoint_model, resolve_checkpoint
from slimpipe.train.config import TrainConfig
from slimpipe.train.data import TokenData, load_data
from slimpipe.train.eval_options import EvalOptions
from slimpipe.train.memory import check_memory

__all__ = ["Prepared", "preflight", "torchrun_env", "TorchrunEnv"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked run: what every rank builds its runtime from."""

    cfg: TrainConfig
    """The resolved config (output paths filled in)."""
    model: ModelConfig
    """The model the runtime builds."""
    schedule: Schedule
    """Compute-only schedule for p = pp ranks and m = global_batch / dp micro-batches."""
    data: TokenData
    """Loaded and checked training data."""
    resume_dir: Path | None
    """Step directory to resume from, or None."""
    hf: HFCheckpoint | None = None
    """The checked --init-from checkpoint whose weights the ranks load (unless resuming), or None."""
    evaluation: EvalOptions | None = None
    """Set by `slimpipe eval`: the ranks evaluate instead of training."""


@dataclass(frozen=True, slots=True)
class TorchrunEnv:
    """The process's place as torchrun (or any env:// launcher) describes it."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def torchrun_env() -> TorchrunEnv | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from the environment, or None when not started by a launcher."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(
        rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


def _model(cfg: TrainConfig, evaluating: bool) -> tuple[ModelConfig, HFCheckpoint | None, Path | None]:
    """(model, --init-from checkpoint, --resume step directory); evaluation takes the model from either."""
    if cfg.init_from and importlib.util.find_spec("safetensors") is None:
        raise ConfigError("--init-from reads safetensors: pip install 'slimpipe[hf]'")
    hf = open_checkpoint(cfg.init_from) if cfg.init_from else None
    resume_dir = resolve_checkpoint(cfg.resume, cfg.checkpoint_dir) if cfg.resume else None
    if evaluating and resume_dir is not None:
        return checkpoint_model(resume_dir), None, resume_dir
    return (hf.model if hf is not None else load_model(cfg.model)), hf, resume_dir


def preflight(cfg: TrainConfig, *, env: TorchrunEnv | None = None, check_outputs: bool = True,
              evaluation: EvalOptions | None = None) -> Prepared:
    """Check the layout, schedule, data, checkpoint and outputs; return what the ranks need."""
    from slimpipe.schedule.builders import build

    cfg = cfg.resolved()
    model, hf, resume_dir = _model(cfg, evaluation is not None)
    layout = ParallelConfig(tp=cfg.tp, cp=cfg.cp, pp=cfg.pp, dp=cfg.dp, ep=cfg.ep, vpp=cfg.vpp, slices=cfg.slices)
    # the rules simulate and plan apply too (slimpipe.rules)
    check_layout(model, layout, cfg.seq_len, vocab_parallel=cfg.vocab_parallel)
    m = layout.microbatches(cfg.global_batch)
    check_exchange(cfg.schedule, cfg.pp, cfg.slices, cfg.attn_balance)
    _check_processes(cfg, env)
    _check_threads(cfg, env)
    schedule = build(cfg.schedule, p=cfg.pp, m=m, n=cfg.slices, v=cfg.vpp, warmup=cfg.warmup,
                     slice_weights=_slice_weights(cfg, model))
    _check_slices_split(cfg, schedule)
    procs = env.local_world if env is not None else cfg.world
    if cfg.device == "cpu":  # before loading data; CUDA runs are checked once torch says how big a GPU is
        check_memory(cfg, model, layout, schedule, local_procs=procs)
    data = load_data(cfg.data, vocab_size=model.vocab_size, seq_len=cfg.seq_len, data_dtype=cfg.data_dtype,
                     tokenizer=cfg.tokenizer, text_field=cfg.text_field, eod_id=cfg.eod_id,
                     need_documents=cfg.pack_documents)
    if resume_dir is not None and evaluation is None:
        check_checkpoint(resume_dir, model=model.to_dict(), seed=cfg.seed, data_fingerprint=data.fingerprint,
                         steps=cfg.steps, data_name=data.name)
    if cfg.trace:
        _check_trace_writer()
    gpu_bytes = _check_device(cfg, env)  # imports torch (~2 s): after every check that needs none
    if cfg.device != "cpu":
        check_memory(cfg, model, layout, schedule, local_procs=procs, device_bytes=gpu_bytes)
    if check_outputs:
        _check_outputs(cfg)  # last: it creates the run directory
    return Prepared(cfg=cfg, model=model, schedule=schedule, data=data, resume_dir=resume_dir, hf=hf,
                    evaluation=evaluation)


def _slice_weights(cfg: TrainConfig, model) -> tuple[float, ...] | None:
    """None (equal slices) or the equal-FLOP slice fractions of --slice-split (the simulator's rule)."""
    from slimpipe.sim.flops import seq1f1b_partition
    from slimpipe.sim.evaluate import resolve_slice_split

    if resolve_slice_split(cfg.schedule, cfg.slice_split) == "equal" or cfg.slices == 1:
        return None
    if cfg.attn_balance:
        raise ConfigError(f"--attn-balance={cfg.attn_balance} needs equal slices (its volumes are whole "
                          "slices): use --slice-split equal or --attn-balance 0")
    try:
        return seq1f1b_partition(model, cfg.seq_len, cfg.slices)
    except ValueError as exc:
        raise ConfigError(f"{exc}: use fewer --slices or --slice-split equal") from None


def _check_processes(cfg: TrainConfig, env: TorchrunEnv | None) -> None:
    need = cfg.world
    layout = ("1 (--local-pipeline)" if cfg.local_pipeline
              else f"tp·cp·pp·dp = {cfg.tp}·{cfg.cp}·{cfg.pp}·{cfg.dp} = {need}")
    if env is not None and env.world != need:
        raise ConfigError(
            f"the launcher started WORLD_SIZE={env.world} processes but the layout needs {layout}: "
            f"start {need} processes or change --tp/--cp/--pp/--dp"
        )
    if env is None and cfg.nproc and cfg.nproc != need:
        raise ConfigError(f"--nproc={cfg.nproc} but the layout needs {layout}: use --nproc {need} or change "
                          "--tp/--cp/--pp/--dp")


def _check_slices_split(cfg: TrainConfig, schedule: Schedule) -> None:
    """Sequence parallelism splits every slice's tokens over t: unequal slices (seq1f1b, equal-FLOP) must
    each divide (equal ones are slimpipe.rules.sequence_problem's)."""
    t = cfg.tp
    for tokens in _slice_tokens(cfg.seq_len, schedule.slice_fractions()) if t > 1 else []:
        if tokens % t:
            raise ConfigError(
                f"--tp {t}: a slice of {tokens} tokens cannot be split over {t} ranks (sequence parallelism): "
                f"use a --seq-len that is a multiple of slices·tp = {cfg.slices * t} and --slice-split equal"
            )


def _slice_tokens(seq_len: int, fractions: tuple[float, ...]) -> list[int]:
    """Tokens per slice, rounded as slimpipe.runtime.stage.slice_bounds rounds them."""
    bounds, cum = [0], 0.0
    for f in fractions[:-1]:
        cum += f
        bounds.append(int(round(cum * seq_len)))
    bounds.append(seq_len)
    return [b1 - b0 for b0, b1 in zip(bounds, bounds[1:])]


def _check_threads(cfg: TrainConfig, env: TorchrunEnv | None) -> None:
    """More torch threads than cores makes every step crawl (measured on 2 cores: --threads 1000 with
    2 ranks, 97 s a step instead of 0.7 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = env.local_world if env is not None else cfg.world
    if cfg.threads > max(1, cores // procs):
        raise ConfigError(
            f"--threads={cfg.threads} × {procs} process(es) = {cfg.threads * procs} threads on {cores} "
            f"cores: oversubscribed ranks run many times slower; use --threads ≤ {max(1, cores // procs)} "
            "(or 0: cores ÷ processes)"
        )


def _check_device(cfg: TrainConfig, env: TorchrunEnv | None) -> float | None:
    """Check the GPU count; returns one GPU's memory in bytes when the run will use CUDA, else None."""
    if cfg.device == "cuda" or cfg.device == "auto":
        try:
            import torch  # only to count GPUs; never initialises CUDA
        except ImportError:  # pragma: no cover - torch is a dependency
            return None
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError("--device cuda but no CUDA device is visible: use --device cpu")
        local = env.local_world if env is not None else cfg.world
        if gpus and local > gpus and cfg.device == "cuda":
            raise ConfigError(
                f"{local} processes on this node but {gpus} GPU(s): NCCL needs one GPU per process; "
                "use fewer processes per node, --local-pipeline, or --device cpu"
            )
        if gpus:
            return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def _check_trace_writer() -> None:
    try:
        from slimpipe.trace import write_chrome_trace  # noqa: F401
    except ImportError:
        raise ConfigError("--trace needs slimpipe.trace.write_chrome_trace, missing from this install: drop --trace") from None


def _check_outputs(cfg: TrainConfig) -> None:
    """The policy of every command (slimpipe.outputs), with --resume also allowed to continue files."""
    out = Path(cfg.out_dir)
    writable_dir(out, "--out-dir", create=True)
    files = [("--log-json", cfg.log_json), ("--out-dir", str(out / "config.json"))]
    if cfg.trace:
        files.append(("--trace", cfg.trace))
    for flag, name in files:
        check_output_file(name, flag, overwrite=cfg.overwrite or bool(cfg.resume), create_dir=True,
                          fix="pass --overwrite, --resume, or another --out-dir")
    if cfg.checkpoint_every:
        ckpt = Path(cfg.checkpoint_dir)
        writable_dir(ckpt, "--checkpoint-dir", create=True)
        if (ckpt / "latest").exists() and not (cfg.overwrite or cfg.resume):
            raise ConfigError(
                f"--checkpoint-dir {ckpt} holds another run's checkpoints: pass --resume to continue it, "
                "--overwrite to replace them, or another --checkpoint-dir"
            )
