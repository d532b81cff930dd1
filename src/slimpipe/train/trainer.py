"""One rank's training loop on the SlimPipe runtime: data, LR schedule, metrics, checkpoints, trace.

Rank 0 owns every file of the run directory (config.json, the JSON-lines log, the trace); all of them are
written under ``.partial`` names and renamed when the run succeeds. Checkpoints are collective (DCP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimpipe.hf.weights import load_hf_weights
from slimpipe.sim.documents import expected_slice_pairs
from slimpipe.train.checkpoint import last_finite_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from slimpipe.train.exits import FAILED, OK, PEER, AgreedError, Diverged
from slimpipe.train.faults import fault_hook
from slimpipe.train.log import StepLogger, measure_peak_flops
from slimpipe.train.preflight import Prepared
from slimpipe.train.watchdog import Watchdog

__all__ = ["run_rank", "lr_at"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_COMM_WORDS = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "peer")
_CLOSED_WORDS = ("connection closed", "connection reset", "broken pipe", "closed by peer")
MAX_SKIPPED = 5
"""--nonfinite skip: a run stops (Diverged) after this many non-finite steps in a row."""


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up over lr_warmup steps, then cosine decay to min_lr_ratio·lr at the last step."""
    if step <= cfg.lr_warmup:
        return cfg.lr * step / cfg.lr_warmup
    span = max(1, cfg.steps - cfg.lr_warmup)
    progress = min(1.0, (step - cfg.lr_warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _device(cfg: Any, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def run_rank(prep: Prepared, *, rank: int, world: int, local_rank: int, store: Any,
             supervised: bool = False) -> int:
    """Join the process group, train, and return an exit code (train/exits.py; errors are printed, never
    raised). ``supervised``: our launcher watches this rank and names the failed rank itself, so a rank that
    stops because of another says nothing."""
    device = _device(prep.cfg, local_rank)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=prep.cfg.timeout), device_id=device if cuda else None)
    watchdog = None
    step = [0]
    try:
        shared = [prep.cfg]  # rank 0's resolved paths win (torchrun ranks resolve timestamps separately)
        dist.broadcast_object_list(shared, src=0)
        prep = dataclasses.replace(prep, cfg=shared[0])
        if world > 1:
            watchdog = Watchdog(store, rank, world, stale_s=max(2.0, prep.cfg.timeout / 3), quiet=supervised)
            watchdog.start()
        if prep.evaluation is not None:
            _evaluate(prep, rank=rank, device=device)
        else:
            _train(prep, rank=rank, world=world, device=device, step=step)
        return OK
    except AgreedError as exc:  # every rank raised it at the same point: rank 0 says why, once
        if rank == 0:  # no abort message: the others would stop as PEER before raising it themselves
            sys.stdout.flush()
            sys.stderr.write(f"slimpipe train: error: {exc}\n")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        return _report_failure(exc, rank=rank, step=step[0], watchdog=watchdog, supervised=supervised)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _report_failure(exc: BaseException, *, rank: int, step: int, watchdog: Watchdog | None,
                    supervised: bool) -> int:
    text = " ".join(str(e).lower() for e in _chain(exc))
    if watchdog is not None and (isinstance(exc, dist.DistError) or any(w in text for w in _COMM_WORDS)):
        if any(w in text for w in _CLOSED_WORDS):  # a peer process is gone: no heartbeat to wait for
            cause = watchdog.abort_message() or "a peer closed its connection (its process ended)"
            watchdog.publish(f"rank {rank} lost a peer at step {step}: {cause}")
        else:
            cause = watchdog.wait_for_cause()  # a peer may be stuck: let the heartbeats name it
        if cause:
            if not supervised:
                sys.stderr.write(f"slimpipe train: rank {rank}: stopping at step {step}: {cause}\n")
            return PEER
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if watchdog is not None:
        watchdog.publish(f"rank {rank} failed at step {step}: {first}")
    sys.stderr.write(f"slimpipe train: rank {rank}: failed at step {step}: {type(exc).__name__}: {exc}\n")
    if not isinstance(exc, (RuntimeError, ValueError, OSError)) or os.environ.get("SLIMPIPE_TRACEBACK"):
        traceback.print_exception(exc, file=sys.stderr)
    return FAILED


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _build_runtime(prep: Prepared, device: torch.device) -> tuple[Any, int]:
    """(runtime, data-parallel rank of this process)."""
    from slimpipe.runtime import LocalPipelineRuntime, OptimConfig, ParallelState, PipelineRuntime

    cfg = prep.cfg
    from slimpipe.runtime.offload import OffloadConfig

    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip)
    memory = dict(recompute=cfg.recompute, offload=OffloadConfig(ratio=cfg.offload, min_bytes=cfg.offload_min_bytes),
                  restart_positions=cfg.doc_positions == "document")
    dtype = _DTYPES[cfg.dtype]
    if cfg.local_pipeline:
        rt = LocalPipelineRuntime(prep.model, prep.schedule, dtype=dtype, seed=cfg.seed, device=device, optim=optim,
                                  attn_balance=cfg.attn_balance, vocab_parallel=cfg.vocab_parallel, **memory)
        return rt, 0
    state = ParallelState.create(pp=cfg.pp, tp=cfg.tp, cp=cfg.cp, dp=cfg.dp, ep=cfg.ep, timeout_s=cfg.timeout)
    rt = PipelineRuntime(prep.model, prep.schedule, state, dtype=dtype, seed=cfg.seed, optim=optim,
                         attn_balance=cfg.attn_balance, vocab_parallel=cfg.vocab_parallel, **memory)
    return rt, state.dp_rank


def _ckpt_meta(prep: Prepared) -> dict[str, Any]:
    cfg = prep.cfg
    return {
        "format": 1, "model": prep.model.to_dict(), "seed": cfg.seed, "data": prep.data.name,
        "data_fingerprint": prep.data.fingerprint, "seq_len": cfg.seq_len, "global_batch": cfg.global_batch,
        "layout": {"tp": cfg.tp, "cp": cfg.cp, "pp": cfg.pp, "dp": cfg.dp, "ep": cfg.ep, "vpp": cfg.vpp,
                   "slices": cfg.slices,
                   "schedule": cfg.schedule},
    }


@dataclasses.dataclass(frozen=True, slots=True)
class _Meter:
    """What turns a StepResult into a JSON record (rank 0 only)."""

    tokens_per_step: int
    world: int
    peak: float
    fpt: float
    fpt_dense: float
    t0: float

    def record(self, step: int, lr: float, res: Any, wall_s: float) -> dict[str, Any]:
        tps = self.tokens_per_step / wall_s
        return {
            "step": step, "loss": res.loss, "grad_norm": res.grad_norm, "lr": lr,
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world, "step_time_s": wall_s,
            "schedule_time_s": res.step_time_s, "mfu": self.fpt * tps / (self.world * self.peak),
            "mfu_dense": self.fpt_dense * tps / (self.world * self.peak), "bubble_ratio": res.bubble_ratio,
            "peak_activation_bytes": [int(b) for b in res.peak_activation_bytes],
            "peak_kv_bytes": [int(b) for b in res.peak_kv_bytes],
            "peak_offloaded_bytes": [int(b) for b in res.peak_offloaded_bytes or ()],
            "max_allocated_bytes": res.cuda_max_allocated, "elapsed_s": time.perf_counter() - self.t0,
        }


def _open_outputs(prep: Prepared, world: int, device: torch.device, start: int) -> tuple[StepLogger, Path, _Meter]:
    """Rank 0: measure the peak, open the log, write the partial config, print the header."""
    cfg = prep.cfg
    if cfg.peak_tflops:
        peak, how = cfg.peak_tflops * 1e12, "--peak-tflops"
    else:
        peak, how = measure_peak_flops(_DTYPES[cfg.dtype], device)
    keys = None  # packed documents: the mean keys a query sees, from the data's document lengths
    if cfg.pack_documents:
        keys = sum(expected_slice_pairs(prep.data.doc_lengths(), [0, cfg.seq_len])[0]) / cfg.seq_len
    fpt = prep.model.flops_per_token(cfg.seq_len, keys_per_query=keys)  # executed; mfu_dense: PaLM convention
    meter = _Meter(cfg.global_batch * cfg.seq_len, world, peak, fpt,
                   prep.model.flops_per_token(cfg.seq_len, causal=False), time.perf_counter())
    logger = StepLogger(cfg.log_json, steps=cfg.steps, start_step=start, log_every=cfg.log_every,
                        progress=cfg.progress)
    config_partial = _write_config(prep, world, device, fpt, peak, how)
    logger.print(_header(prep, world, device, start, peak, how))
    return logger, config_partial, meter


def _train(prep: Prepared, *, rank: int, world: int, device: torch.device, step: list[int]) -> None:
    cfg = prep.cfg
    torch.manual_seed(cfg.seed)
    rt, dp_rank = _build_runtime(prep, device)
    if prep.resume_dir is not None:
        start = load_checkpoint(rt, prep.resume_dir)
    else:
        start = 0
        if prep.hf is not None:
            load_hf_weights(rt, prep.hf)  # each rank reads only the slices it holds
    m = cfg.microbatches
    dist.barrier()  # the other ranks wait idle while rank 0 measures the matmul peak
    logger, config_partial, meter = _open_outputs(prep, world, device, start) if rank == 0 else (None, None, None)
    dist.barrier()
    try:
        res, skipped = None, 0
        for k in range(start + 1, cfg.steps + 1):
            step[0] = k
            fault_hook(rank, k)
            lr = lr_at(k, cfg)
            for group in rt.optimizer.param_groups:
                group["lr"] = lr
            batch = prep.data.batch(k, seed=cfg.seed, batch=cfg.global_batch, seq_len=cfg.seq_len)  # (B, s+1)
            mine = torch.from_numpy(batch[dp_rank * m : (dp_rank + 1) * m]).to(device)  # (m, s+1)
            docs, loss_tokens = _documents(prep, k, dp_rank * m, m)
            t0 = time.perf_counter()
            # schedule, DP all-reduce, clip, AdamW (not applied when the loss or grad norm is nan/inf)
            res = rt.train_step(mine, skip_nonfinite=True, documents=docs, loss_tokens=loss_tokens)
            finite = math.isfinite(res.loss) and math.isfinite(res.grad_norm)
            if logger is not None:
                logger.log({**meter.record(k, lr, res, time.perf_counter() - t0), "skipped": not finite})
            skipped = 0 if finite else skipped + 1
            if skipped and (cfg.nonfinite == "stop" or skipped >= MAX_SKIPPED):
                raise _diverged(cfg, k, res, skipped)
            if cfg.checkpoint_every and (k % cfg.checkpoint_every == 0 or k == cfg.steps):
                save_checkpoint(rt, cfg.checkpoint_dir, k, _ckpt_meta(prep), rank=rank,
                                keep=cfg.keep_checkpoints, loss=res.loss, finite=finite)
        trace = _gather_trace(res, world) if cfg.trace and res is not None else None
        if logger is not None:
            _publish(prep, logger, config_partial, trace)
    finally:
        if logger is not None:
            logger.close()


def _documents(prep: Prepared, step: int, first: int, rows: int) -> tuple[torch.Tensor | None, int | None]:
    """--pack-documents: this replica's (m, s+1) document indices and the global batch's loss-taking
    labels (the normaliser: no loss across a document boundary); else (None, None)."""
    cfg = prep.cfg
    if not cfg.pack_documents:
        return None, None
    ids = prep.data.batch_documents(step, seed=cfg.seed, batch=cfg.global_batch, seq_len=cfg.seq_len)
    taken = int((ids[:, 1:] == ids[:, :-1]).sum())
    return torch.from_numpy(ids[first : first + rows]), max(taken, 1)


def _diverged(cfg: Any, step: int, res: Any, skipped: int) -> Diverged:
    """The one line a diverged run ends with (the same on every rank: loss and norm are global)."""
    back = last_finite_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_every else None
    where = (f"the newest checkpoint with a finite loss is {back}" if back else "no checkpoint with a finite "
             "loss to go back to")
    run = f"{skipped} steps in a row (--nonfinite skip)" if skipped > 1 else "--nonfinite stop"
    return Diverged(f"step {step}: loss {res.loss:.4g}, grad norm {res.grad_norm:.4g} are not finite; the "
                    f"update was not applied and the run stopped ({run}); {where}: lower --lr (now "
                    f"{cfg.lr:g}) or lengthen --lr-warmup, then --resume")


def _evaluate(prep: Prepared, *, rank: int, device: torch.device) -> None:
    """`slimpipe eval` on this rank: weights from --resume or --init-from, then the forward-only loop."""
    from slimpipe.train.evaluate import evaluate_loop

    rt, _ = _build_runtime(prep, device)
    if prep.resume_dir is not None:
        load_model_weights(rt, prep.resume_dir)
    elif prep.hf is not None:
        load_hf_weights(rt, prep.hf)
    evaluate_loop(prep, rt, rank=rank, device=device)


def _gather_trace(res: Any, world: int) -> list[tuple[Any, ...]] | None:
    """The last step's executed actions of every rank, gathered to rank 0 as slimpipe.trace events.

    The runtime stamps events with the wall clock (ranks on other nodes line up as well as their clocks
    do); they are shifted to seconds since the earliest event; pid = global rank.
    """
    mine = [(e.rank, e.action, e.start_s, e.end_s) for e in res.trace]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (dist.get_rank(), mine))
    if dist.get_rank() != 0:
        return None
    t0 = min((ev[2] for _, evs in gathered for ev in evs), default=0.0)
    out = []
    for grank, evs in gathered:
        for pp_rank, action, start, end in evs:
            # local pipeline: one process runs every pipeline rank, so the row is the pipeline rank
            pid = pp_rank if world == 1 else grank
            out.append((pid, action, start - t0, end - t0, {"pp_rank": pp_rank, "global_rank": grank}))
    return out


def _write_config(prep: Prepared, world: int, device: torch.device, fpt: float, peak: float, how: str) -> Path:
    cfg = prep.cfg
    path = Path(cfg.out_dir) / "config.json.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = {
        "train": cfg.to_dict(),
        "model": prep.model.to_dict(),
        "derived": {
            "world": world, "microbatches": cfg.microbatches, "device": str(device),
            "backend": "nccl" if device.type == "cuda" else "gloo", "threads": torch.get_num_threads(),
            "params": prep.model.num_params(), "flops_per_token": fpt, "peak_flops": peak, "peak_source": how,
            "data": prep.data.name, "data_tokens": prep.data.num_tokens, "schedule_meta": prep.schedule.meta.to_dict(),
            "resumed_from": str(prep.resume_dir) if prep.resume_dir else None, "torch": torch.__version__,
        },
    }
    path.write_text(json.dumps(resolved, indent=1, default=str) + "\n")
    return path


def _header(prep: Prepared, world: int, device: torch.device, start: int, peak: float, how: str) -> str:
    cfg, mdl = prep.cfg, prep.model
    lines = [
        f"slimpipe train: {mdl.name} ({mdl.num_params() / 1e6:.1f}M params, L={mdl.num_layers} h={mdl.hidden}) "
        f"on {prep.data.name}",
        f"  layout {f'tp={cfg.tp} ' if cfg.tp > 1 else ''}{f'cp={cfg.cp} ' if cfg.cp > 1 else ''}"
        f"pp={cfg.pp} dp={cfg.dp}{f' ep={cfg.ep}' if cfg.ep > 1 else ''} vpp={cfg.vpp} "
        f"slices={cfg.slices} schedule={cfg.schedule} "
        f"m={cfg.microbatches}{_memory_flags(cfg)} | seq {cfg.seq_len} × batch {cfg.global_batch} = "
        f"{cfg.seq_len * cfg.global_batch:,} tokens/step | {cfg.dtype}",
        f"  {world} process(es) on {device.type}, {torch.get_num_threads()} thread(s) each | peak "
        f"{peak / 1e12:.3g} TFLOP/s per process ({how}) | out {cfg.out_dir}",
        "  mfu = executed FLOPs 6N + 6·L·H·Q·T (causal attention as run) per token; the log's mfu_dense: "
        "6N + 12·L·H·Q·T" if not cfg.pack_documents else
        "  mfu = executed FLOPs 6N + 12·L·H·Q·K (K: keys per query under document-causal attention, expected "
        "from the data's document lengths) per token; the log's mfu_dense: 6N + 12·L·H·Q·T",
    ]
    if start:
        lines.append(f"  resumed from {prep.resume_dir} at step {start}")
    return "\n".join(lines)


def _memory_flags(cfg: Any) -> str:
    out = f" recompute={cfg.recompute}" if cfg.recompute != "none" else ""
    return out + (f" offload={cfg.offload:g}" if cfg.offload else "")


def _publish(prep: Prepared, logger: StepLogger, config_partial: Path, trace: list[dict[str, Any]] | None) -> None:
    """Success: move every output into place."""
    cfg = prep.cfg
    if trace is not None:
        from slimpipe.trace import write_chrome_trace

        partial = cfg.trace + ".partial"
        write_chrome_trace(trace, partial)
        os.replace(partial, cfg.trace)
    os.replace(config_partial, config_partial.with_name("config.json"))
    logger.finish()
    logger.print(f"done: {logger.summary()}")
    logger.print(f"  log {cfg.log_json}, config {Path(cfg.out_dir) / 'config.json'}"
                 + (f", trace {cfg.trace}" if cfg.trace else ""))
