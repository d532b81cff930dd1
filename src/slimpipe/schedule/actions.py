"""The schedule IR: actions keyed by (kind, stage, micro-batch, slice), and the Schedule that holds them.

Glossary (used everywhere in slimpipe; see docs/design.md):
  rank        pipeline rank r in [0, p); rank 0 holds the embedding side.
  stage       global model partition s = k·p + r (Megatron's interleaved assignment), s in [0, p·v).
  virtual stage k in [0, v): the k-th stage held by a rank.
  micro-batch one sequence (b = 1) of the m a pipeline processes per step.
  slice       one of n pieces of a sequence (equal unless the schedule says otherwise); never "chunk".
  unit        one (stage, micro-batch, slice): the smallest thing a builder schedules.

String form: ``<stage><KIND><microbatch>.<slice>`` such as ``2F3.1`` (stage 2, forward, micro-batch 3,
slice 1) — a superset of torch.distributed.pipelining's ``2F3``; the ``.slice`` part may be omitted when 0.
Communication actions name the unit whose tensor moves: ``1SEND_F0.2`` sends the output of ``1F0.2``
downstream; ``2RECV_F0.2`` receives the input of ``2F0.2``; ``2SEND_B0.2`` sends the input gradient of
``2B0.2`` upstream; ``1RECV_B0.2`` receives the output gradient of ``1B0.2``. Vocabulary-parallel
collectives (``VE0.2``, ``VH0.2``, ``VB0.2``: docs/vocab_parallel.md) run on every rank and name no stage.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Kind", "Action", "Schedule", "ScheduleMeta", "parse_action", "COMPUTE_KINDS", "COMM_KINDS",
    "VOCAB_KINDS", "NO_STAGE", "EXCHANGE_KINDS",
]


class Kind(str, Enum):
    """What an action does. Each member's comment is its meaning, "Roughly:" one line of code."""

    F = "F"  # Roughly: out = stage(inp, kv_prefix); keep what backward needs
    B = "B"  # Roughly: grad_in, dkv_prefix = autograd.backward([out, *kv], [dout, *dkv])
    W = "W"  # Roughly: weight gradients of a split backward (reserved: no builder emits it yet)
    SEND_F = "SEND_F"  # Roughly: isend(out of F(stage, mb, slice), to=rank_of(stage + 1))
    RECV_F = "RECV_F"  # Roughly: inp of F(stage, mb, slice) = recv(from=rank_of(stage - 1))
    SEND_B = "SEND_B"  # Roughly: isend(grad_in of B(stage, mb, slice), to=rank_of(stage - 1))
    RECV_B = "RECV_B"  # Roughly: dout of B(stage, mb, slice) = recv(from=rank_of(stage + 1))
    # Vocabulary parallelism (schedule/vocab.py): lock-step collectives over all p ranks, no stage ("VH0.2").
    VE = "VE"  # Roughly: inp of F(0, mb, slice) = reduce(Σ_r embed_shard_r[ids], to=rank 0)
    VH = "VH"  # Roughly: y = bcast(norm(out of F(last))); loss, dy_r = ce_r(y @ W_r.T); dout = reduce(dy_r)
    VB = "VB"  # Roughly: g = bcast(grad_in of B(0, mb, slice), from=rank 0); W_r.grad[ids in r] += g
    # Attention context exchange (schedule/exchange.py): a marker right before its rank's own F (or B) that
    # names the PARTNER's concurrent unit ("3XOWN_F1.4  0F1.7": rank 0's 0F1.7 hands attention to 3F1.4).
    XOWN_F = "XOWN_F"  # Roughly: per layer of the next F: isend(q, kv[:vol]); out = lse_merge(local, recv())
    XHELP_F = "XHELP_F"  # Roughly: per layer of the next F: q, kv = recv(); isend(attn(q, kv, no mask), lse)
    XOWN_B = "XOWN_B"  # Roughly: per layer of next B: isend(dout, q, out, lse, kv[:vol]); dq, dkv += recv()
    XHELP_B = "XHELP_B"  # Roughly: per layer of the next B: isend(attn_backward(recv())) = (dq, dk, dv)

    def __str__(self) -> str:  # "F", not "Kind.F"
        return self.value


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.W})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
VOCAB_KINDS = frozenset({Kind.VE, Kind.VH, Kind.VB})
"""Collectives every rank runs, in one order: their Action has stage NO_STAGE and prints without it."""
NO_STAGE = -1
EXCHANGE_KINDS = frozenset({Kind.XOWN_F, Kind.XHELP_F, Kind.XOWN_B, Kind.XHELP_B})
"""Attention-exchange markers: they name the partner's unit, so their stage lives on another rank."""

# Longest kind names first so "SEND_F" is not read as "S" + ...
_KIND_ALT = "|".join(sorted((k.value for k in Kind), key=len, reverse=True))
_ACTION_RE = re.compile(rf"^(\d+)?({_KIND_ALT})(\d+)(?:\.(\d+))?$")


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One step of one rank's program."""

    stage: int
    """Global stage index s = k·p + r."""
    kind: Kind
    """What the action does."""
    microbatch: int
    """Micro-batch index in [0, m)."""
    seq_slice: int = 0
    """Slice index in [0, n); 0 for unsliced schedules."""

    def __str__(self) -> str:
        if self.kind in VOCAB_KINDS:  # collectives belong to no stage: "VH0.2"
            return f"{self.kind.value}{self.microbatch}.{self.seq_slice}"
        return f"{self.stage}{self.kind.value}{self.microbatch}.{self.seq_slice}"

    @property
    def unit(self) -> tuple[int, int, int]:
        """(stage, micro-batch, slice): the unit this action belongs to."""
        return (self.stage, self.microbatch, self.seq_slice)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS


def parse_action(text: str) -> Action:
    """Parse the string form (``2F3.1``, ``2F3``, ``1SEND_F0.2``) back into an Action."""
    m = _ACTION_RE.match(text.strip())
    if m is None:
        raise ValueError(
            f"cannot parse action {text!r}: expected <stage><KIND><microbatch>[.<slice>] such as '2F3.1'"
            f" with KIND one of {[k.value for k in Kind]}"
        )
    stage, kind, mb, sl = m.groups()
    if (stage is None) != (Kind(kind) in VOCAB_KINDS):
        raise ValueError(
            f"cannot parse action {text!r}: vocabulary collectives ({sorted(k.value for k in VOCAB_KINDS)}) "
            "are written without a stage ('VH0.2'), every other kind with one ('2F3.1')"
        )
    return Action(NO_STAGE if stage is None else int(stage), Kind(kind), int(mb), int(sl or 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleMeta:
    """What a schedule carries besides its programs. Builders set w and g; the passes set the rest, and
    the exchange pass, the vocabulary pass and the runtime read them."""

    w: int | None = None
    """Warm-up factor the builder used (1 single, 2 double; None: no steady state, GPipe)."""
    g: int | None = None
    """Group size: (micro-batch, slice) pairs a rank forwards per virtual stage before switching."""
    attn_balance: int = 0
    """Attention context exchange threshold: most slices one exchange moves (0: no exchange)."""
    vocab_parallel: bool = False
    """The vocabulary collectives (VE/VH/VB) were placed (schedule/vocab.py)."""
    exchange_latency: float | None = None
    """p2p latency of the dry run that paired the exchange (None: the pass's default for w)."""

    def to_dict(self) -> dict[str, object]:
        """The fields that are set (w and g when not None, the others when not default), for JSON."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if value != default:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ScheduleMeta:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"schedule metadata has unknown keys {unknown}: keep only "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**data)  # type: ignore[arg-type]  (JSON values; the fields check their own types)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Per-rank ordered action lists plus the metadata that describes them.

    A schedule is a value: it can be printed, diffed, serialised, validated, lowered and simulated
    before any tensor exists. Builders return compute-only schedules (F/B[/W]); ``lower`` adds the
    SEND/RECV actions the runtime executes.
    """

    name: str
    """Builder name that produced it (``slimpipe``, ``1f1b``, ...), or ``custom``."""
    num_ranks: int
    """p: pipeline-parallel size."""
    virtual_stages: int
    """v: stages per rank."""
    num_microbatches: int
    """m: micro-batches per pipeline per step."""
    num_slices: int
    """n: slices per sequence."""
    ranks: tuple[tuple[Action, ...], ...]
    """ranks[r] = the ordered program of pipeline rank r."""
    slice_weights: tuple[float, ...] | None = None
    """Relative token length of each slice (sums to 1); None means n equal slices (Seq1F1B sets it)."""
    meta: ScheduleMeta = field(default_factory=ScheduleMeta, compare=False, hash=False)
    """Builder parameters (w, g) and what the passes added (exchange threshold, vocabulary collectives)."""

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """Megatron's interleaved assignment: stage s lives on rank s mod p."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range [0, {self.num_stages})")
        return stage % self.num_ranks

    def virtual_stage_of(self, stage: int) -> int:
        return stage // self.num_ranks

    @property
    def is_lowered(self) -> bool:
        return any(a.kind in COMM_KINDS for prog in self.ranks for a in prog)

    def slice_fractions(self) -> tuple[float, ...]:
        """Fraction of the sequence each slice covers."""
        if self.slice_weights is None:
            return tuple(1.0 / self.num_slices for _ in range(self.num_slices))
        return self.slice_weights

    def replace_ranks(self, ranks: tuple[tuple[Action, ...], ...], **meta: object) -> Schedule:
        """A copy with other per-rank programs (what passes return); ``meta``: ScheduleMeta fields to change."""
        return Schedule(
            name=self.name,
            num_ranks=self.num_ranks,
            virtual_stages=self.virtual_stages,
            num_microbatches=self.num_microbatches,
            num_slices=self.num_slices,
            ranks=ranks,
            slice_weights=self.slice_weights,
            meta=dataclasses.replace(self.meta, **meta) if meta else self.meta,
        )

    def compute_only(self) -> Schedule:
        """The same schedule with communication actions removed."""
        return self.replace_ranks(tuple(tuple(a for a in prog if a.is_compute) for prog in self.ranks))
