"""Expert parallelism: the all-to-all token dispatcher and the expert gradient groups.

Megatron's layout (SlimPipe reference §11): the d·c data(×context)-parallel ranks of one (pp, tp)
coordinate split into groups of e consecutive members (``ParallelState.ep_group``); expert-parallel rank i
of a group holds experts [i·E/e, (i+1)·E/e) of every MoE layer of its stages, and the d·c/e ranks holding
the same experts form the expert-data-parallel group (``edp_group``) over which expert gradients are summed
— every other parameter is summed over the whole dp·cp group.

The members of an expert group run the same schedule on different micro-batches, so each slice forward
of an MoE layer is a collective over the group: the routed copies of the slice's tokens travel to their
expert's rank (all-to-all with per-rank counts exchanged first), are computed there together with the
other members' copies for the same experts, and travel back; the slice's backward mirrors it (dispatch
gradients return to the tokens' rank). Every member executes its program's F and B actions in the same
order, so the collectives pair up without any extra ordering.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch import nn

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.models.moe import ExpertGroup, ExpertPlacement, is_expert_parameter, scatter_rows
from slimpipe.runtime.parallel_state import ParallelState

__all__ = ["AllToAllDispatcher", "all_to_all", "expert_placement", "split_expert_params"]


class _AllToAll(torch.autograd.Function):
    """Rows ``send[i]`` to member i, ``recv[i]`` from it; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: object) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: object) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: object) -> torch.Tensor:
    """Differentiable all-to-all of rows of x (R, …): ``send[i]`` consecutive rows go to member i."""
    return _AllToAll.apply(x, send, recv, group)


class AllToAllDispatcher:
    """Dispatcher (models/moe.py) over an expert-parallel group of ``size`` members."""

    def __init__(self, group: object, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: ExpertGroup) -> torch.Tensor:
        """x (M, h) sorted by global expert, counts (E,) → expert outputs (M, h) in the same order."""
        e = self.size
        send = counts.view(e, -1)  # (e, E/e): copies for each member's local experts
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[i, j]: from i for expert j
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = all_to_all(x, send_rows, recv_rows, self.group)  # by source member, then local expert
        # Regroup by local expert (source order within one) for the expert computation, then back.
        local = torch.arange(send.size(1), device=x.device).repeat(e)  # expert of each (source, expert) run
        order = torch.argsort(torch.repeat_interleave(local, recv.flatten()), stable=True)
        out = experts(arrived.index_select(0, order), recv.sum(0).tolist())
        back = scatter_rows(out, order, out.size(0))  # arrival order
        return all_to_all(back, recv_rows, send_rows, self.group)


def expert_placement(model: object, state: ParallelState) -> ExpertPlacement | None:
    """The experts this rank holds under ``state.ep``: None (all of them, no dispatcher) when e = 1."""
    if state.ep == 1:
        return None
    if not isinstance(model, ModelConfig) or model.num_experts == 1:
        raise ConfigError(f"--ep={state.ep} needs an MoE model (num_experts > 1): use --ep 1")
    if model.num_experts % state.ep:
        raise ConfigError(f"--ep={state.ep} does not divide num_experts={model.num_experts}: pick a divisor")
    return ExpertPlacement(rank=state.ep_rank, size=state.ep,
                           dispatcher=AllToAllDispatcher(state.ep_group, state.ep))


def split_expert_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, the experts' parameters), in registration order."""
    dense, experts = [], []
    for name, p in model.named_parameters():
        (experts if is_expert_parameter(name) else dense).append(p)
    return dense, experts
