"""Parallel state: one named device mesh (dp, cp, pp, tp) and its process groups, passed explicitly.

**Rank order.** ``init_device_mesh(device, (d, c, p, t), mesh_dim_names=("dp", "cp", "pp", "tp"))``, so

    global rank = ((dp_rank · c + cp_rank) · p + pp_rank) · t + tp_rank

tp is innermost (a TP group is t consecutive ranks, i.e. inside one node when t ≤ GPUs per node: TP talks
every layer), then pp, then cp, then dp outermost (DP talks once per step). With c = t = 1 this is the
earlier ``arange(world).view(dp, pp)`` grid. Example d2 c1 p2 t2 (8 ranks)::

    dp 0: pp 0 = ranks {0, 1}, pp 1 = {2, 3}      tp groups {0,1} {2,3} {4,5} {6,7}
    dp 1: pp 0 = ranks {4, 5}, pp 1 = {6, 7}      pp groups {0,2} {1,3} {4,6} {5,7}; dp groups {0,4} ...

**Groups of one rank** (every group carries ``timeout_s``, so a dead peer is an error, not a hang):

* one per mesh axis: ``dp_group``, ``cp_group``, ``pp_group``, ``tp_group`` (``mesh.get_group(name)``);
* flattened: ``dp_cp_group`` (ranks holding the same parameter shard: gradient all-reduce, loss sum;
  ``mesh["dp_cp"]``) and ``pp_tp_group`` (the model-parallel ranks of one replica: grad norm,
  vocabulary parallelism over t·p; ``mesh["pp_tp"]``);
* point-to-point channels over this rank's pp ranks (same ranks as ``pp_group``, separate communicators so
  the directions never queue behind each other and no tag is needed — NCCL ignores tags): ``fwd_group``
  (activations), ``bwd_group`` (gradients), ``exchange_group`` (attention context exchange,
  runtime/exchange.py), ``vocab_group`` (vocabulary-parallel messages, runtime/vocab_comm.py);
* ``embed_group`` {pp rank 0, pp rank p−1} of this (dp, cp, tp) coordinate when p > 1 (tied embeddings).

**Context parallelism** uses ``cp_group`` (the c ranks of one (dp, pp, tp) coordinate, consecutive in
steps of p·t). **Expert parallelism** (MoE, ``ep`` = e) splits the d·c ranks of ``dp_cp_group``
(mesh["dp_cp"] order) into groups of e consecutive members, ``ep_group`` (Megatron's layout: the expert
group lies inside the data×context-parallel ranks); the d·c/e ranks at the same position of every expert
group hold the same experts and form ``edp_group`` (expert gradients are summed there). Example d4 c1 p1
t1, e = 2: ep groups {0,1} {2,3}, edp groups {0,2} {1,3}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelState", "AXES"]

AXES = ("dp", "cp", "pp", "tp")
"""Mesh axis names, outermost first."""
_CHANNELS = ("fwd", "bwd", "exchange", "vocab")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelState:
    """Where this process sits in the (dp, cp, pp, tp) mesh, and its process groups."""

    rank: int
    """Global rank."""
    world: int
    """World size = d·c·p·t."""
    dp: int
    """d: data-parallel replicas."""
    cp: int
    """c: context-parallel size (runtime/context_parallel.py: zig-zag pieces, query-out attention)."""
    pp: int
    """p: pipeline-parallel size."""
    tp: int
    """t: tensor-parallel size (with sequence parallelism)."""
    dp_rank: int
    """Data-parallel replica index in [0, d)."""
    cp_rank: int
    """Context-parallel rank in [0, c)."""
    pp_rank: int
    """Pipeline rank r in [0, p)."""
    tp_rank: int
    """Tensor-parallel rank in [0, t)."""
    device: torch.device
    """cuda:<local rank> with NCCL, else cpu."""
    mesh: DeviceMesh
    """The 4-D mesh, axes AXES; also holds the flattened "dp_cp" and "pp_tp" meshes."""
    dp_group: ProcessGroup
    """The d ranks of this (cp, pp, tp) coordinate."""
    cp_group: ProcessGroup
    """The c ranks of this (dp, pp, tp) coordinate."""
    pp_group: ProcessGroup
    """The p ranks of this pipeline (loss broadcast, statistics, vocabulary collectives)."""
    tp_group: ProcessGroup
    """The t ranks of this (dp, cp, pp) coordinate (TP/SP collectives inside every layer)."""
    dp_cp_group: ProcessGroup
    """The d·c ranks holding the same parameter shard (gradient all-reduce, loss sum)."""
    pp_tp_group: ProcessGroup
    """The p·t model-parallel ranks of one replica (grad norm; vocabulary parallelism over t·p)."""
    fwd_group: ProcessGroup
    """Forward p2p channel (activations), same ranks as pp_group."""
    bwd_group: ProcessGroup
    """Backward p2p channel (gradients), same ranks as pp_group."""
    exchange_group: ProcessGroup
    """Attention-exchange channel (runtime/exchange.py), same ranks as pp_group."""
    vocab_group: ProcessGroup
    """Vocabulary-parallel VE/VB point-to-point messages (runtime/vocab_comm.py), same ranks as pp_group."""
    embed_group: ProcessGroup | None
    """{pp rank 0, pp rank p−1} of this (dp, cp, tp) coordinate on those two ranks when p > 1 (tied-embedding
    sum), else None."""
    timeout_s: float
    """Timeout of every group created here."""
    ep: int = 1
    """e: expert-parallel size (MoE), a divisor of d·c."""
    ep_rank: int = 0
    """Position in the expert group, in [0, e): holds experts [ep_rank·E/e, (ep_rank+1)·E/e)."""
    ep_group: ProcessGroup | None = None
    """The e ranks of this expert group (token all-to-all, runtime/experts.py); None when e = 1."""
    edp_group: ProcessGroup | None = None
    """The d·c/e ranks holding this rank's experts (expert-gradient all-reduce); dp_cp_group when e = 1."""

    @classmethod
    def create(cls, *, pp: int, tp: int = 1, cp: int = 1, dp: int | None = None, ep: int = 1,
               timeout_s: float = 600.0) -> ParallelState:
        """Build the mesh after ``torch.distributed.init_process_group`` (collective: call on every rank,
        in the same order; every call creates new communicators). ``dp`` defaults to world / (c·p·t)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelState.create needs torch.distributed.init_process_group(...) first")
        world, rank = dist.get_world_size(), dist.get_rank()
        model = pp * tp * cp
        if dp is None and model > 0 and world % model == 0:
            dp = world // model
        if dp is None or min(pp, tp, cp, dp) < 1 or dp * model != world:
            raise ValueError(
                f"tp·cp·pp·dp = {tp}·{cp}·{pp}·{'?' if dp is None else dp} must equal the world size {world}: "
                "fix --tp/--cp/--pp/--dp or the number of processes"
            )
        if ep < 1 or (dp * cp) % ep:
            raise ValueError(f"--ep={ep} must divide dp·cp={dp * cp}: the expert groups are made of "
                             "data(×context)-parallel ranks; change --ep or --dp")
        timeout = timedelta(seconds=timeout_s)
        device = _device()
        mesh, axis = _mesh_groups(device, (dp, cp, pp, tp), timeout)
        coords = dict(zip(AXES, _coords(rank, (dp, cp, pp, tp))))
        pp_ranks = mesh.mesh.movedim(2, -1).reshape(-1, pp).tolist()  # every pipeline, in mesh order
        channels = {name: _subgroup(pp_ranks, timeout) for name in _CHANNELS}
        embed = _subgroup([[r[0], r[-1]] for r in pp_ranks], timeout, member=False) if pp > 1 else None
        ep_group, edp_group = _expert_groups(mesh, ep, timeout) if ep > 1 else (None, axis["dp_cp"])
        return cls(
            rank=rank, world=world, dp=dp, cp=cp, pp=pp, tp=tp, dp_rank=coords["dp"], cp_rank=coords["cp"],
            pp_rank=coords["pp"], tp_rank=coords["tp"], device=device, mesh=mesh,
            dp_group=axis["dp"], cp_group=axis["cp"], pp_group=axis["pp"], tp_group=axis["tp"],
            dp_cp_group=axis["dp_cp"], pp_tp_group=axis["pp_tp"], fwd_group=channels["fwd"],
            bwd_group=channels["bwd"], exchange_group=channels["exchange"], vocab_group=channels["vocab"],
            embed_group=embed, timeout_s=timeout_s, ep=ep, ep_rank=(coords["dp"] * cp + coords["cp"]) % ep,
            ep_group=ep_group, edp_group=edp_group,
        )

    def rank_of(self, *, dp: int | None = None, cp: int | None = None, pp: int | None = None,
                tp: int | None = None) -> int:
        """Global rank at the given coordinates; omitted axes take this rank's own."""
        d = self.dp_rank if dp is None else dp
        c = self.cp_rank if cp is None else cp
        r = self.pp_rank if pp is None else pp
        i = self.tp_rank if tp is None else tp
        return ((d * self.cp + c) * self.pp + r) * self.tp + i

    def global_rank(self, pp_rank: int) -> int:
        """Global rank of pipeline rank ``pp_rank`` at this rank's (dp, cp, tp) coordinates."""
        return self.rank_of(pp=pp_rank)


def _coords(rank: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        rank, c = divmod(rank, size)
        out.append(c)
    return out[::-1]


def _options(backend: str, timeout: timedelta) -> tuple[str, object]:
    """(backend, options carrying the timeout): DeviceMesh groups otherwise get the 30-minute default."""
    from torch.distributed import distributed_c10d as c10d

    if backend == "nccl":
        opts = c10d.ProcessGroupNCCL.Options()
    else:
        opts = c10d.ProcessGroupGloo._Options()
    opts._timeout = timeout
    return backend, opts


def _mesh_groups(device: torch.device, shape: tuple[int, int, int, int],
                 timeout: timedelta) -> tuple[DeviceMesh, dict[str, ProcessGroup]]:
    """The mesh, its flattened dp_cp and pp_tp meshes, and this rank's group of each axis."""
    override = _options(str(dist.get_backend()), timeout)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXES,
                            backend_override={name: override for name in AXES})
    mesh["dp", "cp"]._flatten("dp_cp", backend_override=override)
    mesh["pp", "tp"]._flatten("pp_tp", backend_override=override)
    return mesh, {name: mesh.get_group(name) for name in (*AXES, "dp_cp", "pp_tp")}


def _expert_groups(mesh: DeviceMesh, ep: int, timeout: timedelta) -> tuple[ProcessGroup, ProcessGroup]:
    """(expert group, expert-data-parallel group) of this rank: per (pp, tp) coordinate the d·c ranks in
    dp_cp order, cut into runs of e (ep) and strided by e (edp)."""
    d, c, p, t = mesh.mesh.shape
    columns = mesh.mesh.reshape(d * c, p * t).t().tolist()  # one list of d·c ranks per (pp, tp)
    ep_runs = [col[i : i + ep] for col in columns for i in range(0, d * c, ep)]
    edp_runs = [col[j::ep] for col in columns for j in range(ep)]
    return _subgroup(ep_runs, timeout), _subgroup(edp_runs, timeout)


def _subgroup(members: list[list[int]], timeout: timedelta, *, member: bool = True) -> ProcessGroup:
    """Create one group per rank list (collective over the world); this rank's (None when it is in none,
    allowed only with ``member=False``)."""
    mine, _ = dist.new_subgroups_by_enumeration(members, timeout=timeout)
    assert mine is not None or not member, "every rank belongs to one of the groups"
    return mine  # type: ignore[return-value]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
