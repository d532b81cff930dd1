"""LocalPipelineRuntime: every rank of one pipeline in one process, through in-memory channels.

The ranks are the same RankExecutors as in the distributed runtime with a LocalTransport instead of
torch.distributed: same handlers, same programs, no schedule logic of its own. They run cooperatively:
each rank executes until its next RECV has nothing queued, then the next rank runs; a full round in
which no rank executes anything is a deadlock and raises, naming every rank's blocked action. Useful for
debugging, fast tests, and per-stage memory of a whole pipeline on one device. dp = 1 (emulate DP by
several runtimes with ``loss_tokens`` set to the global token count).

step_time_s is the whole sequential run, so bubble_ratio here only says how the work split over ranks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

from slimpipe.config import ModelConfig
from slimpipe.models.base import DecoderParts
from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.exchange import local_exchange, with_exchange
from slimpipe.runtime.host_memory import retain_freed_host_memory
from slimpipe.runtime.executor import RankExecutor
from slimpipe.runtime.offload import OffloadConfig, as_offload
from slimpipe.runtime.optim import OptimConfig, build_optimizer, squared_norm
from slimpipe.runtime.p2p import LocalHub, LocalTransport
from slimpipe.runtime.pipeline import check_tokens, executor_stats, prepare_schedule, reduce_step_stats
from slimpipe.runtime.result import PipelineError, StepResult
from slimpipe.runtime.steps import StepLoop
from slimpipe.runtime.stage import RankModel, as_parts, build_rank_model, stages_of_rank
from slimpipe.runtime.vocab import vocab_runtime, vocab_stages, with_vocab
from slimpipe.runtime.vocab_comm import LocalCollectiveHub, LocalCollectives
from slimpipe.runtime.vocab_state import VocabLayout, full_model_state, load_model_state
from slimpipe.schedule.actions import Schedule
from slimpipe.schedule.format import to_grid

__all__ = ["LocalPipelineRuntime"]


class LocalPipelineRuntime(StepLoop):
    """All p ranks of one pipeline (dp = 1) in this process."""

    def __init__(self, model: ModelConfig | DecoderParts, schedule: Schedule, *,
                 dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu",
                 optim: OptimConfig | None = None, check_schedule: bool = True,
                 mask_mode: str = "auto", attn_balance: int = 0, vocab_parallel: bool = False,
                 recompute: str = "none",
                 offload: float | OffloadConfig = 0.0, restart_positions: bool = True) -> None:
        self.parts = as_parts(model)
        self.restart_positions = restart_positions  # packed documents: RoPE positions per document
        self.vocab_parallel = vocab_parallel  # embedding/head sharded over all ranks (docs/vocab_parallel.md)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            retain_freed_host_memory()  # no page faults for each step's buffers (runtime/host_memory.py)
        p = schedule.num_ranks
        # attn_balance > 0: exchange markers; here owners compute the moved blocks (runtime/exchange.py).
        self.schedule = prepare_schedule(with_exchange(with_vocab(schedule, vocab_parallel), attn_balance),
                                         pp=p, num_layers=self.parts.num_layers, check=check_schedule)
        vocab_hub = LocalCollectiveHub(p)  # in-process VE/VH/VB collectives (runtime/vocab_comm.py)
        shards = []
        self.hub = LocalHub()
        masks = MaskCache(mask_mode)  # one table for the whole process
        self.models: list[RankModel] = []
        self.executors: list[RankExecutor] = []
        for r in range(p):
            stages = stages_of_rank(self.parts.num_layers, p, self.schedule.virtual_stages, r)
            stages = vocab_stages(stages) if vocab_parallel else stages
            model = build_rank_model(self.parts, stages, seed=seed, device=self.device, dtype=dtype)
            vocab = None if not vocab_parallel else vocab_runtime(
                model, self.parts, rank=r, p=p, seed=seed, device=self.device, dtype=dtype,
                driver=LocalCollectives(vocab_hub, r))
            shards.append(None if vocab is None else vocab.shard)
            self.models.append(model)
            self.executors.append(RankExecutor(
                rank=r, schedule=self.schedule, model=model, stages=stages,
                transport=LocalTransport(self.hub, r), hidden=self.parts.hidden, device=self.device,
                dtype=dtype, masks=masks, exchange=local_exchange(self.schedule, r), vocab=vocab,
                recompute=recompute, offload=as_offload(offload),
            ))
        self.shards = shards
        self.vocab_layout = None if not vocab_parallel else VocabLayout(
            vocab=self.parts.vocab_size, members=tuple(zip(self.models, shards)), gather=list)
        self.optim_config = optim or OptimConfig()
        # Every rank's parameters, tied replicas included (they get identical grads, so stay identical).
        self.optimizer = build_optimizer(
            ((n, q) for m in self.models for n, q in m.named_parameters()), self.optim_config)
        self.step = 0

    # ---- parameters ---------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(global name, Parameter) over all stages; a tied replica is listed once (rank 0's). With
        vocab_parallel every rank holds an ``embed.weight`` shard: use rank_parameters or model_state_dict."""
        seen: set[str] = set()
        for model in self.models:
            for name, param in model.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield name, param

    def rank_parameters(self, rank: int) -> Iterator[tuple[str, nn.Parameter]]:
        return self.models[rank].named_parameters()

    def _has_exchange(self) -> bool:
        return any(ex.exchange is not None for ex in self.executors)

    def rank_models(self) -> list[tuple[RankModel, object]]:
        """(model, vocabulary shard or None) of every pipeline rank: what a checkpoint loader fills."""
        return list(zip(self.models, self.shards))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.vocab_layout is not None:  # shards joined into the full vocabulary tensors
            return full_model_state(self.vocab_layout)
        return {n: p.detach() for n, p in self.named_parameters()}

    def load_model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.vocab_layout is not None:
            return load_model_state(self.vocab_layout, state_dict)
        for model in self.models:
            model.load_state_dict({k: state_dict[k] for k in model.state_dict()})

    def zero_grad(self) -> None:
        for model in self.models:
            model.zero_grad(set_to_none=True)

    # ---- steps --------------------------------------------------------------------------------------
    def _grad_norm(self) -> float:
        return math.sqrt(sum(float(squared_norm(m.norm_parameters(), self.device)) for m in self.models))

    def _trainable_parameters(self):
        return (p for model in self.models for p in model.parameters())

    def _run(self, tokens: torch.Tensor, loss_tokens: int | None, evaluate: Schedule | None = None, *,
             documents: torch.Tensor | None = None) -> StepResult:
        check_tokens(tokens, evaluate or self.schedule)
        tokens = tokens.to(self.device)
        docs = self._docs(tokens, documents)
        labels = tokens.size(0) * (tokens.size(1) - 1) if docs is None else docs.valid_labels
        normaliser = loss_tokens if loss_tokens is not None else labels
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for r, ex in enumerate(self.executors):
            ex.begin_step(self.step, tokens, normaliser, program=None if evaluate is None else evaluate.ranks[r],
                          docs=docs)
        self.step += 1
        self.hub.queues.clear()
        t0 = time.time()
        self._round_robin()
        for ex in self.executors:
            ex.end_step()
        elapsed = time.time() - t0
        if self.hub.pending():
            raise PipelineError(f"messages never received at the end of the step: {self.hub.pending()}")
        values = [executor_stats(ex, elapsed) for ex in self.executors]
        trace = sorted((ev for ex in self.executors for ev in ex.trace), key=lambda e: e.start_s)
        loss = float(sum(ex.loss_sum for ex in self.executors))  # MoE ranks add their balancing loss
        res = reduce_step_stats(values, trace, loss, math.nan, False)
        if self.device.type == "cuda":  # one device for every rank: only the process-wide peak exists
            res = dataclasses.replace(res, cuda_max_allocated=[torch.cuda.max_memory_allocated(self.device)])
        return res

    def _round_robin(self) -> None:
        gens = {r: ex.run() for r, ex in enumerate(self.executors)}
        blocked: dict[int, object] = {}
        while gens:
            progress = False
            for r in list(gens):
                before = self.executors[r].executed
                try:
                    blocked[r] = next(gens[r])
                except StopIteration:
                    del gens[r]
                    blocked.pop(r, None)
                    progress = True
                    continue
                progress = progress or self.executors[r].executed != before
            if gens and not progress:
                raise PipelineError(self._deadlock_message(blocked))

    def _deadlock_message(self, blocked: dict[int, object]) -> str:
        marks = [(r, self.executors[r].executed) for r in sorted(blocked)]
        what = "; ".join(f"rank {r} waits at step {i} ({blocked[r]})" for r, i in marks)
        return (f"deadlock in step {self.step - 1}: every unfinished rank waits on a RECV with nothing "
                f"queued: {what}\n{to_grid(self.schedule, marks=marks, window=8)}")

    def _reduce_grads(self) -> None:
        first, last = self.models[0], self.models[-1]
        if last.embed_replica:  # p > 1 with tied embeddings: sum the replicas' grads
            g0, g1 = first.embed.weight.grad, last.embed.weight.grad
            total = g0 if g1 is None else (g1 if g0 is None else g0 + g1)
            first.embed.weight.grad, last.embed.weight.grad = total, total.clone()
