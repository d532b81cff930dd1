"""PipelineRuntime: one process = one pipeline rank of one DP replica, over torch.distributed.

A step: execute this rank's lowered program (slimpipe.runtime.executor), then — for train_step — sum the
tied-embedding gradients over the embedding group, all-reduce gradients over the DP group, compute the
global grad norm over the pipeline (DP replicas hold identical gradients by then), clip and step AdamW.
The per-slice loss is already divided by the token count of the global batch, so plain sums (over slices,
micro-batches, DP replicas) give the global-batch mean and its gradient.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.models.base import DecoderParts
from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.context_parallel import ContextParallel
from slimpipe.runtime.cp_attention import CPGroup
from slimpipe.runtime.exchange import dist_exchange, with_exchange
from slimpipe.runtime.executor import RankExecutor
from slimpipe.runtime.host_memory import retain_freed_host_memory
from slimpipe.runtime.experts import expert_placement, split_expert_params
from slimpipe.runtime.offload import OffloadConfig, as_offload
from slimpipe.runtime.optim import OptimConfig, build_optimizer, squared_norm
from slimpipe.runtime.p2p import DistTransport
from slimpipe.runtime.parallel_state import ParallelState
from slimpipe.runtime.result import StepResult
from slimpipe.runtime.steps import StepLoop
from slimpipe.runtime.stage import RankModel, as_parts, build_rank_model, slice_bounds, stages_of_rank
from slimpipe.runtime.tensor_parallel import TensorParallel
from slimpipe.runtime.tp_state import TPLayout, local_tensors
from slimpipe.runtime.vocab import vocab_runtime, vocab_stages, with_vocab
from slimpipe.runtime.vocab_comm import DistCollectives
from slimpipe.runtime.vocab_state import VocabLayout, dist_gather, full_model_state, load_model_state
from slimpipe.rules import sequence_problem
from slimpipe.schedule.actions import Schedule
from slimpipe.schedule.passes import lower
from slimpipe.schedule.validate import validate

__all__ = ["PipelineRuntime", "prepare_schedule", "check_tokens", "context_parallel"]


def prepare_schedule(schedule: Schedule, *, pp: int, num_layers: int, check: bool = True) -> Schedule:
    """Lower (idempotent) and validate; ``check=False`` skips validation (to test the runtime's own
    checks)."""
    if schedule.num_ranks != pp:
        raise ConfigError(
            f"schedule has p={schedule.num_ranks} ranks but the pipeline has pp={pp}: build it with p={pp}"
        )
    stages_of_rank(num_layers, schedule.num_ranks, schedule.virtual_stages, 0)  # layer divisibility check
    lowered = lower(schedule)
    if check:
        validate(lowered)
    return lowered


def check_tokens(tokens: torch.Tensor, schedule: Schedule, tp: int = 1, *, cp: int = 1) -> None:
    m, n = schedule.num_microbatches, schedule.num_slices
    if tokens.dim() != 2 or tokens.size(0) != m or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens must be a LongTensor (m, s+1) = ({m}, s+1): one row per micro-batch of the schedule, "
            f"got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if tokens.size(1) - 1 < n:
        raise ConfigError(f"sequence length {tokens.size(1) - 1} is shorter than the {n} slices: use s ≥ n")
    if tp > 1 or cp > 1:  # SP splits every slice's tokens over t; CP cuts each slice into 2c pieces
        shard = tp * (2 * cp if cp > 1 else 1)
        bounds = slice_bounds(tokens.size(1) - 1, schedule.slice_fractions())
        bad = [b1 - b0 for b0, b1 in zip(bounds, bounds[1:]) if (b1 - b0) % shard]
        if bad:
            raise ConfigError(sequence_problem(tokens.size(1) - 1, n, tp, cp) or (
                f"slices of {bad[0]} tokens do not split into {shard} equal shards (tp={tp}"
                f"{f', 2c={2 * cp} zig-zag pieces' if cp > 1 else ''}): use equal slices and a sequence "
                f"length that is a multiple of {n * shard}"))


def context_parallel(state: ParallelState) -> ContextParallel | None:
    """This rank's context parallelism over ``state.cp_group`` (None when c = 1)."""
    if state.cp == 1:
        return None
    return ContextParallel(CPGroup(state.cp_group, state.cp, state.cp_rank))


def reduce_step_stats(values: list[list[float]], trace, loss: float, grad_norm: float,
                      cuda: bool) -> StepResult:
    """values[r] = [peak_total, peak_kv, peak_saved, busy_s, elapsed_s, cuda_max, peak_offloaded,
    offload copy_s, offload exposed_s] of pipeline rank r."""
    step_time = max(v[4] for v in values)
    busy = [v[3] for v in values]
    return StepResult(
        loss=loss, grad_norm=grad_norm, step_time_s=step_time, trace=trace,
        peak_activation_bytes=[int(v[0]) for v in values], peak_kv_bytes=[int(v[1]) for v in values],
        peak_saved_bytes=[int(v[2]) for v in values], busy_s=busy,
        bubble_ratio=1.0 - sum(busy) / (len(values) * step_time) if step_time > 0 else 0.0,
        cuda_max_allocated=[int(v[5]) for v in values] if cuda else None,
        peak_offloaded_bytes=[int(v[6]) for v in values],
        offload_copy_s=[v[7] for v in values], offload_exposed_s=[v[8] for v in values],
    )


def executor_stats(ex: RankExecutor, elapsed: float) -> list[float]:
    pk = ex.tracker.peaks()
    cuda = torch.cuda.max_memory_allocated(ex.device) if ex.device.type == "cuda" else 0
    copy_s, exposed_s = ex.offload.copy_seconds() if ex.offload is not None else (0.0, 0.0)
    return [float(pk.total), float(pk.kv), float(pk.saved), ex.busy_s, elapsed, float(cuda),
            float(pk.offloaded), copy_s, exposed_s]


class PipelineRuntime(StepLoop):
    """This process's pipeline rank (see docs/runtime.md)."""

    def __init__(self, model: ModelConfig | DecoderParts, schedule: Schedule, state: ParallelState, *,
                 dtype: torch.dtype = torch.float32, seed: int = 0, optim: OptimConfig | None = None,
                 check_schedule: bool = True, mask_mode: str = "auto", attn_balance: int = 0,
                 vocab_parallel: bool = False, recompute: str = "none",
                 offload: float | OffloadConfig = 0.0, restart_positions: bool = True) -> None:
        if state.device.type == "cpu":
            retain_freed_host_memory()  # no page faults for each step's buffers (runtime/host_memory.py)
        self.parts = as_parts(model, expert_placement(model, state))
        self.restart_positions = restart_positions  # packed documents: RoPE positions per document
        self.state = state
        self.vocab_parallel = vocab_parallel  # embedding/head sharded over all ranks (docs/vocab_parallel.md)
        # attn_balance > 0: add attention-exchange markers (docs/exchange.md) before lowering/validation.
        # vocab_parallel: lower and place the VE/VH/VB collectives (schedule/vocab.py) before validation.
        self.schedule = prepare_schedule(with_exchange(with_vocab(schedule, vocab_parallel), attn_balance),
                                         pp=state.pp, num_layers=self.parts.num_layers, check=check_schedule)
        p, v = self.schedule.num_ranks, self.schedule.virtual_stages
        self.stages = stages_of_rank(self.parts.num_layers, p, v, state.pp_rank)
        if vocab_parallel:
            self.stages = vocab_stages(self.stages)
        self.tp = TensorParallel(group=state.tp_group if state.tp > 1 else None, size=state.tp,
                                 rank=state.tp_rank)
        self.model: RankModel = build_rank_model(self.parts, self.stages, seed=seed, device=state.device,
                                                 dtype=dtype, tp=self.tp)
        self.vocab = None if not vocab_parallel else vocab_runtime(
            self.model, self.parts, rank=state.pp_rank, p=p, seed=seed, device=state.device, dtype=dtype,
            driver=DistCollectives(state), tp=self.tp)
        self.vocab_layout = None if self.vocab is None else VocabLayout(
            vocab=self.parts.vocab_size, members=((self.model, self.vocab.shard),),
            gather=dist_gather(state.pp_tp_group, p * state.tp))
        # checkpoints: TP pieces as DTensors on the TP mesh (runtime/tp_state.py), None when t = 1
        self.tp_layout = None if state.tp == 1 else TPLayout(mesh=state.mesh["tp"], shards=self.model.tp_shards)
        self.optim_config = optim or OptimConfig()
        self.optimizer = build_optimizer(self.model.named_parameters(), self.optim_config)
        self.executor = RankExecutor(
            rank=state.pp_rank, schedule=self.schedule, model=self.model, stages=self.stages,
            transport=DistTransport(state), hidden=self.parts.hidden, device=state.device, dtype=dtype,
            masks=MaskCache(mask_mode), vocab=self.vocab, recompute=recompute, offload=as_offload(offload),
            exchange=dist_exchange(self.schedule, state, replays_attention=recompute == "full"),
            seq_shards=state.tp, cp=context_parallel(state),
        )
        self.step = 0

    # ---- parameters ---------------------------------------------------------------------------------
    def named_parameters(self):
        """(global name, Parameter) of this rank's stages."""
        return self.model.named_parameters()

    def _has_exchange(self) -> bool:
        return self.executor.exchange is not None

    def rank_models(self) -> list[tuple[RankModel, object]]:
        """(this rank's model, its vocabulary shard or None): what a checkpoint loader fills (hf/weights.py)."""
        return [(self.model, None if self.vocab is None else self.vocab.shard)]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Global names; with vocab_parallel the vocabulary tensors are full (gathered: collective); with
        tensor parallelism the split weights are DTensors (their global shape and this rank's piece)."""
        state = full_model_state(self.vocab_layout) if self.vocab_layout is not None else self.model.state_dict()
        return state if self.tp_layout is None else self.tp_layout.model_state(state)

    def load_model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        state_dict = local_tensors(state_dict)  # DTensors (loaded by DCP for this rank's piece) → pieces
        if self.vocab_layout is not None:  # full vocabulary tensors in, this rank's rows kept
            return load_model_state(self.vocab_layout, state_dict)
        self.model.load_state_dict(state_dict)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    # ---- steps --------------------------------------------------------------------------------------
    def _trainable_parameters(self):
        return self.model.parameters()

    def _run(self, tokens: torch.Tensor, loss_tokens: int | None, evaluate: Schedule | None = None, *,
             documents: torch.Tensor | None = None) -> StepResult:
        check_tokens(tokens, evaluate or self.schedule, self.state.tp, cp=self.state.cp)
        st, ex = self.state, self.executor
        tokens = tokens.to(st.device)
        docs = self._docs(tokens, documents)
        labels = tokens.size(0) * (tokens.size(1) - 1) if docs is None else docs.valid_labels
        normaliser = loss_tokens if loss_tokens is not None else labels * st.dp
        if st.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(st.device)
        ex.begin_step(self.step, tokens, normaliser,
                      program=None if evaluate is None else evaluate.ranks[st.pp_rank], docs=docs)
        self.step += 1
        t0 = time.time()
        for blocked in ex.run():
            raise RuntimeError(f"distributed transport yielded on {blocked}: its receives must block")
        ex.end_step()
        elapsed = time.time() - t0
        loss = ex.loss_sum.clone()
        if st.dp * st.cp > 1:
            dist.all_reduce(loss, group=st.dp_cp_group)
        if st.pp > 1:  # the last rank holds the cross-entropy, MoE ranks their balancing loss
            dist.all_reduce(loss, group=st.pp_group)
        stats = torch.tensor(executor_stats(ex, elapsed), dtype=torch.float64, device=st.device)
        gathered = [torch.empty_like(stats) for _ in range(st.pp)]
        dist.all_gather(gathered, stats, group=st.pp_group)
        values = [g.tolist() for g in gathered]
        return reduce_step_stats(values, list(ex.trace), float(loss), math.nan, st.device.type == "cuda")

    def _reduce_grads(self) -> None:
        st, model = self.state, self.model
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tied_ends = model.tied and not self.vocab_parallel  # vocab shards are disjoint: nothing to sum
        if st.embed_group is not None and tied_ends and st.pp_rank in (0, st.pp - 1):
            dist.all_reduce(model.embed.weight.grad, group=st.embed_group)  # Megatron's embedding group
        if st.tp > 1:  # sequence parallelism: a replicated weight saw only this rank's tokens
            _all_reduce_grads(model.tp_replicated(), st.tp_group)
        # Every replica of a shard: dense weights over the DP and CP ranks, experts over the ranks holding
        # the same experts (runtime/experts.py); the all-to-all already summed their expert group's tokens.
        dense, experts = split_expert_params(model)
        if st.dp * st.cp > 1:
            _all_reduce_grads(dense, st.dp_cp_group)
        if st.dp * st.cp > st.ep:
            _all_reduce_grads(experts, st.edp_group)

    def _grad_norm(self) -> float:
        st = self.state
        experts = {id(p) for p in split_expert_params(self.model)[1]}
        counted = list(self.model.norm_parameters())  # every shard once: replicas and TP copies left out
        sq = squared_norm((p for p in counted if id(p) not in experts), st.device)
        sq_experts = squared_norm((p for p in counted if id(p) in experts), st.device)
        if st.ep > 1:  # the expert group's members hold different experts
            dist.all_reduce(sq_experts, group=st.ep_group)
        sq += sq_experts
        if st.pp * st.tp > 1:
            dist.all_reduce(sq, group=st.pp_tp_group)
        return math.sqrt(float(sq))


def _all_reduce_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Sum the gradients of ``params`` over ``group`` through one flat buffer."""
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
