"""Vocabulary parallelism at run time: sharded embedding and output layer, and the VE/VH/VB handlers.

With ``vocab_parallel=True`` (SlimPipe reference §9, docs/vocab_parallel.md) the embedding and the output
layer are cut along the vocabulary into p shards of ``rows = ceil(V/p)`` rows; rank r owns token ids
[r·rows, (r+1)·rows) (the last shard is padded with zero rows that never win a softmax: their logits are
-inf). Parameter names stay global (``embed.weight``, ``head.weight``: this rank's rows; ``norm.weight`` on
the last rank), and :mod:`slimpipe.runtime.vocab_state` converts shards to and from the full tensors
(model and optimizer state), so checkpoints stay layout-free. Stages then hold only their layers: stage 0
takes its input from VE, the last stage hands its output to VH, both through the executor's EndsPort
(runtime/ports.py).

The three actions (schedule/vocab.py), as programs over :mod:`slimpipe.runtime.vocab_comm`:

* VE(mb, j): ``part = shard[ids] (0 where the id is elsewhere)``; rank 0 receives ``Σ_r part_r`` as the
  input leaf of F(0, mb, j);
* VH(mb, j): the last rank applies the final norm, broadcasts ``y (1, t, h)``; every rank computes its
  logits ``y @ W_r.T (t, rows)`` and its (max, Σexp, target logit), all-gathered in one round and
  combined like an online softmax; loss = log Σexp + max − target, divided by the global token count;
  at once the backward: ``g = softmax − onehot`` on the shard, ``W_r.grad += gᵀ y``, and ``Σ_r g W_r`` is
  reduced to the last rank, which back-propagates it through the norm: the output gradient of B(last).
  Nothing of the head survives the action (no logits held across the schedule);
* VB(mb, j): rank 0's input gradient of B(0, mb, j) is broadcast; every rank adds the rows of its shard.

Gradients of the vocabulary layers are computed by hand (no autograd), exactly: the float64 tests match
the unsliced reference to 1e-10.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from slimpipe.config import ConfigError
from slimpipe.models.base import DecoderParts, init_parameters, param_generator
from slimpipe.runtime.ports import EndsPort
from slimpipe.runtime.stage import RankModel, StageInfo
from slimpipe.runtime.tensor_parallel import TensorParallel
from slimpipe.runtime.vocab_comm import Collective, Driver, Program
from slimpipe.schedule.actions import Action, Kind, Schedule
from slimpipe.schedule.vocab import add_vocab_parallel, has_vocab, waits_for

__all__ = [
    "VocabShard", "VocabRuntime", "vocab_rows", "vocab_stages", "attach_vocab_shards", "with_vocab",
    "vocab_runtime", "VOCAB_SHARDED",
]

VOCAB_SHARDED = ("embed.weight", "head.weight")
"""Parameter names that are vocabulary shards (dim 0) under vocab_parallel."""
_LOW = (torch.bfloat16, torch.float16)


def vocab_rows(vocab: int, p: int) -> int:
    """Rows per shard: ceil(V / p) (V padded to a multiple of p)."""
    return -(-vocab // p)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VocabShard:
    """Which token ids a rank owns."""

    vocab: int
    """V."""
    rows: int
    """ceil(V/p): rows of every shard (padding included)."""
    lo: int
    """First token id of this shard."""
    valid: int
    """Rows backed by real token ids (rows, or fewer on the last shard)."""

    @classmethod
    def of(cls, vocab: int, p: int, rank: int) -> VocabShard:
        rows = vocab_rows(vocab, p)
        lo = rank * rows
        return cls(vocab=vocab, rows=rows, lo=lo, valid=max(0, min(rows, vocab - lo)))

    def local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids − lo clamped into the shard, mask of ids this shard owns)."""
        mask = (ids >= self.lo) & (ids < self.lo + self.valid)
        return (ids - self.lo).clamp(0, self.rows - 1), mask


def with_vocab(schedule: Schedule, vocab_parallel: bool) -> Schedule:
    """The schedule a runtime executes: with the VE/VH/VB collectives placed (lowered) when vocab_parallel,
    refused if it carries them but the runtime does not shard the vocabulary."""
    if vocab_parallel:
        return add_vocab_parallel(schedule)
    if has_vocab(schedule):
        raise ConfigError(
            "the schedule carries vocabulary collectives (VE/VH/VB) but vocab_parallel=False: pass "
            "vocab_parallel=True or a schedule without them"
        )
    return schedule


def vocab_stages(stages: Sequence[StageInfo]) -> list[StageInfo]:
    """The stages of a vocab-parallel rank: layers only (embedding and head live in the shards)."""
    return [dataclasses.replace(st, first=False, last=False) for st in stages]


class _SharedWeight(nn.Module):
    """The tied head: reads the embedding shard's weight without registering it twice."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self._embed = [embed]

    @property
    def weight(self) -> torch.Tensor:
        return self._embed[0].weight


def _check_parts(parts: DecoderParts) -> None:
    """Vocab-parallel computes the ends by hand: a plain lookup and a bias-free linear head."""
    with torch.random.fork_rng(devices=[]):  # probing must not move the global generator
        _probe_parts(parts)


def _probe_parts(parts: DecoderParts) -> None:
    emb = parts.embedding()
    plain = (isinstance(emb, nn.Embedding) and emb.padding_idx is None and emb.max_norm is None
             and not emb.scale_grad_by_freq and tuple(emb.weight.shape) == (parts.vocab_size, parts.hidden))
    head = parts.head(emb if parts.tie_embeddings else None)
    named = dict(head.named_parameters())
    weight = emb.weight if parts.tie_embeddings else named.get("weight")
    ok = plain and weight is not None and len(named) == (0 if parts.tie_embeddings else 1)
    if ok:
        with torch.no_grad():
            nn.init.normal_(weight)
            x = torch.randn(1, 2, parts.hidden)
            ok = torch.allclose(head(x), x @ weight.t(), atol=1e-4)
    if not ok:
        raise ConfigError(
            "vocab_parallel=True shards the embedding and the head by hand: it needs an nn.Embedding "
            "(no padding_idx/max_norm) and a bias-free linear head (LlamaParts); use vocab_parallel=False "
            "with this DecoderParts"
        )


def attach_vocab_shards(model: RankModel, parts: DecoderParts, *, rank: int, p: int, seed: int,
                        device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None) -> VocabShard:
    """Register this rank's shards as ``embed`` (and ``head`` when untied) and, on the last rank, ``norm``;
    initialise each shard as rows of the full tensor drawn from (seed, global name). With tensor
    parallelism the vocabulary is cut into t·p shards, shard r·t + i on (pp rank r, TP rank i)."""
    _check_parts(parts)
    t, i = (tp.size, tp.rank) if tp is not None else (1, 0)
    shard = VocabShard.of(parts.vocab_size, p * t, rank * t + i)
    model.sharded |= set(VOCAB_SHARDED)
    model.embed = nn.Embedding(shard.rows, parts.hidden)
    model.head = _SharedWeight(model.embed) if parts.tie_embeddings else nn.Linear(parts.hidden, shard.rows,
                                                                                  bias=False)
    for name, module in (("embed.weight", model.embed), ("head.weight", model.head)):
        if isinstance(module, _SharedWeight):
            continue
        full = torch.empty(parts.vocab_size, parts.hidden)  # the layout-free initial values, then our rows
        parts.init_parameter(name, full, param_generator(seed, name))
        rows = torch.zeros(shard.rows, parts.hidden)
        rows[: shard.valid] = full[shard.lo : shard.lo + shard.valid]
        module.weight = nn.Parameter(rows)
    if rank == p - 1:
        model.norm = parts.final_norm()
        init_parameters(parts, model.norm.named_parameters(prefix="norm"), seed)
    model.to(device=device, dtype=dtype)
    return shard


class VocabRuntime:
    """The VE/VH/VB handlers of one rank (bound to its RankExecutor)."""

    def __init__(self, model: RankModel, shard: VocabShard, *, rank: int, p: int, driver: Driver,
                 tp: TensorParallel | None = None) -> None:
        self.model, self.shard, self.rank, self.p, self.driver = model, shard, rank, p, driver
        self._port: EndsPort | None = None  # the RankExecutor, set by bind()
        self.tp = tp if tp is not None else TensorParallel(group=None, size=1, rank=0)
        self.index = rank * self.tp.size + self.tp.rank  # this shard's place among the t·p

    @property
    def ex(self) -> EndsPort:
        if self._port is None:
            raise RuntimeError("VocabRuntime used before bind(executor)")
        return self._port

    def bind(self, executor: EndsPort) -> dict[Kind, Callable[[Action], None]]:
        """Attach to ``executor`` (through its EndsPort); its handler table entries for the vocabulary kinds."""
        self._port = executor
        return {Kind.VE: self._post, Kind.VH: self._post, Kind.VB: self._post}

    def begin_step(self) -> None:
        self.clock = [0.0]  # busy seconds of this rank's vocabulary programs in the step
        self.driver.begin_step()

    def end_step(self) -> None:
        self.driver.finish()
        self.ex.add_busy(self.clock[0])

    def complete(self, a: Action) -> bool:
        """Whether the executor may go past ``a`` (in-process driver: the others have posted too)."""
        return not waits_for(a.kind, self.rank, self.p) or self.driver.complete(_key(a))

    def _post(self, a: Action) -> None:
        if a.kind is Kind.VH:
            self.driver.drain()  # VB receipts parked earlier: everyone meets at VH anyway
        program = {Kind.VE: self._embed, Kind.VH: self._head, Kind.VB: self._embed_backward}[a.kind]
        self.driver.run(_key(a), program(a.microbatch, a.seq_slice),
                        waits=waits_for(a.kind, self.rank, self.p), clock=self.clock)

    # ---- programs ---------------------------------------------------------------------------------
    def _ids(self, mb: int, j: int, shift: int = 0) -> torch.Tensor:
        """Slice j's ids (shift 0) or labels (shift 1) on this rank: its CP share under context parallelism."""
        b = self.ex.bounds
        return (self.ex.labels if shift else self.ex.ids)[mb, b[j] : b[j + 1]]  # (t,)

    def _embed(self, mb: int, j: int) -> Program:
        local, mask = self.shard.local(self._ids(mb, j))
        weight = self.model.embed.weight.detach()
        part = (weight[local] * mask[:, None].to(weight.dtype)).unsqueeze(0).contiguous()  # (1, t, h)
        total = yield Collective(op="reduce", tensor=part, root=0, p2p=True)
        if self.rank == 0:
            assert total is not None
            if self.tp.size > 1:  # Σ over the TP ranks too, each keeping its token shard (1, t/T, h)
                total = yield Collective(op="reduce_scatter_seq", tensor=total)
            self.ex.put_embedding(mb, j, total.requires_grad_())  # the input leaf of F(0, mb, j)

    def _embed_backward(self, mb: int, j: int) -> Program:
        h, ex = self.model.embed.weight.size(1), self.ex
        grad = ex.take_embedding_grad(mb, j).contiguous() if self.rank == 0 else None  # (1, t/T, h)
        if grad is not None and self.tp.size > 1:
            grad = yield Collective(op="all_gather_seq", tensor=grad)  # (1, t, h)
        grad = yield Collective(op="broadcast", tensor=grad, root=0, shape=(1, len(self._ids(mb, j)), h),
                                dtype=ex.dtype, p2p=True)
        assert grad is not None
        local, mask = self.shard.local(self._ids(mb, j))
        weight = self.model.embed.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, local[mask], grad[0][mask].to(weight.dtype))

    def _head(self, mb: int, j: int) -> Program:
        last, ex, sh = self.p - 1, self.ex, self.shard
        t, h = len(self._ids(mb, j)), self.model.embed.weight.size(1)
        x = y = None
        if self.rank == last:
            x = ex.take_head_input(mb, j)  # (1, t/T, h) the last stage's output, a leaf
            with torch.enable_grad():
                y = self.model.norm(x)  # on this TP rank's tokens (sequence parallelism)
        y_mine = None if y is None else y.detach().contiguous()
        if y_mine is not None and self.tp.size > 1:
            y_mine = yield Collective(op="all_gather_seq", tensor=y_mine)  # (1, t, h)
        y_all = yield Collective(op="broadcast", tensor=y_mine, root=last, shape=(1, t, h), dtype=ex.dtype)
        assert y_all is not None
        head = self.model.head.weight
        w = head.detach().float() if head.dtype in _LOW else head.detach()
        yf = y_all[0].to(w.dtype)  # (t, h)
        logits = yf @ w.t()  # (t, rows)
        logits[:, sh.valid :] = -math.inf  # padding rows of the last shard
        labels = self._ids(mb, j, shift=1)  # (t,), −100 where no loss is taken (packed documents)
        local, mask = sh.local(labels)
        taken = labels >= 0
        lmax = logits.max(dim=1).values  # (t,), −inf on a shard of padding only
        target = torch.where(mask, logits.gather(1, local[:, None])[:, 0], torch.zeros_like(lmax))
        e = logits.sub_(torch.nan_to_num(lmax, neginf=0.0)[:, None]).exp_()  # (t, rows) in place
        # One round for the normaliser: every shard's (max, Σexp relative to it, target logit), combined
        # like an online softmax: M = max_r m_r, S = Σ_r s_r·exp(m_r − M). Identical on every rank.
        stats = yield Collective(op="all_gather", tensor=torch.stack([lmax, e.sum(dim=1), target]))
        assert stats is not None  # (t·p, 3, t): every vocabulary shard's, in shard order
        gmax = stats[:, 0].max(dim=0).values
        rescale = torch.exp(stats[:, 0] - gmax)  # (p, t)
        sumexp = (stats[:, 1] * rescale).sum(dim=0)
        if self.rank == last:  # everyone knows the loss; one rank accounts it
            loss = (torch.log(sumexp) + gmax - stats[:, 2].sum(dim=0)) * taken
            ex.add_loss(loss.sum().double() / ex.normaliser)
        if not ex.training:  # a forward-only step (every rank alike): no head gradient, no reduce
            return
        g = e.mul_((rescale[self.index] / sumexp * taken)[:, None])  # softmax on the shard, − onehot, / count
        rows = torch.arange(t, device=g.device)[mask]
        g[rows, local[mask]] -= 1.0
        g.div_(ex.normaliser)
        if head.grad is None:
            head.grad = torch.zeros_like(head)
        if head.dtype == g.dtype:
            head.grad.addmm_(g.t(), yf)  # (rows, h), accumulated in place
        else:
            head.grad += (g.t() @ yf).to(head.dtype)
        dy = (g @ w).to(ex.dtype).unsqueeze(0).contiguous()  # (1, t, h): this shard's part of dL/dy
        dy = yield Collective(op="reduce", tensor=dy, root=last)
        if self.rank == last:
            assert dy is not None and x is not None and y is not None
            if self.tp.size > 1:  # Σ over the TP ranks' shards too, each keeping its tokens (1, t/T, h)
                dy = yield Collective(op="reduce_scatter_seq", tensor=dy)
                assert dy is not None
            torch.autograd.backward(y, dy)  # through the final norm
            ex.put_head_grad(mb, j, x.grad)  # output gradient of B(last, mb, j)


def _key(a: Action) -> tuple[str, int, int]:
    return (a.kind.value, a.microbatch, a.seq_slice)


def vocab_runtime(model: RankModel, parts: DecoderParts, *, rank: int, p: int, seed: int,
                  device: torch.device, dtype: torch.dtype, driver: Driver,
                  tp: TensorParallel | None = None) -> VocabRuntime:
    """Attach this rank's vocabulary shards to ``model`` (before its optimizer is built) and return the
    handlers that run the VE/VH/VB actions through ``driver``."""
    shard = attach_vocab_shards(model, parts, rank=rank, p=p, seed=seed, device=device, dtype=dtype, tp=tp)
    return VocabRuntime(model, shard, rank=rank, p=p, driver=driver, tp=tp)
