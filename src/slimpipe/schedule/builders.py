"""Schedule builders: pure functions from counts to compute-only schedules (F/B actions).

Every builder here is one instance of a single loop, the slice-wise 1F1B rule of SlimPipe (§4 of the
reference), over a per-rank *forward order* and *backward order* of units:

* **Units and groups.** The m·n (micro-batch, slice) items are cut into groups of g consecutive items: g
  divides n (a group holds g slices of one micro-batch: SlimPipe's cycles) or n divides g (a group holds
  g/n whole micro-batches: Megatron's micro-batch groups when n = 1).
* **Forward order** on every rank: ``for group: for k in 0..v-1: for item in group: F(k·p + r, item)``.
* **Backward order**: groups FIFO by micro-batch, and inside one micro-batch its groups in reverse;
  inside a group ``for k in v-1..0: for item by (micro-batch asc, slice desc): B(k·p + r, item)``. Within
  one (stage, micro-batch) this is the exact reverse of the forward order, as the K/V carry requires.
* **Loop rule** on rank r: target T = (position of the forward unit the first backward depends on)
  + w·(p − 1 − r); run a forward while in-flight < T and forwards remain, then a backward whenever
  in-flight ≥ T (T = 0 once forwards run out). w is the warm-up factor: 1 (single, synchronous p2p) or 2
  (the authors' double warm-up for overlapped p2p, Megatron's interleaved rule).

Instances: ``1f1b`` = (n=1, v=1, w=1), Megatron's schedule exactly; ``interleaved-1f1b`` = (n=1, v, w=2,
g = p), Megatron's virtual-pipeline schedule; ``slimpipe`` = (n, v, g = smallest divisor of n that is ≥ p),
SlimPipe's slice-wise 1F1B (interleaved when v > 1); ``seq1f1b`` = (n = k segments, v=1, w=1, optional
unequal segment lengths); ``gpipe`` = all forwards, then all backwards (T = ∞; TeraPipe's order when n > 1).
So ``slimpipe`` with n = 1 is ``1f1b`` (v = 1) or ``interleaved-1f1b`` (v > 1), action for action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from slimpipe.config import ConfigError
from slimpipe.schedule.actions import Action, Kind, Schedule, ScheduleMeta

__all__ = ["build", "BUILDERS", "WARMUPS", "group_size", "warmup_factor", "slice_1f1b"]

WARMUPS = ("auto", "single", "double")


def warmup_factor(warmup: str, v: int, n: int = 1) -> int:
    """w for a warm-up name.

    auto = single (1) for the unsliced, non-interleaved case (n = v = 1: Megatron's 1F1B exactly) and the
    authors' double (2) otherwise: it is what SlimPipe's code and published memory model use, and it hides
    p2p latency that single exposes (docs/design.md: at a latency of half a forward, slimpipe p4 n8 m4
    runs 126 vs 108 time units, for 14 vs 11 units in flight). Interleaved builders fall back to single
    when the last group is partial (see _interleaved_warmup); seq1f1b's own rule is single.
    """
    if warmup not in WARMUPS:
        raise ConfigError(f"--warmup={warmup!r} is unknown: use one of {', '.join(WARMUPS)}")
    if warmup == "auto":
        return 1 if v == 1 and n == 1 else 2
    return 1 if warmup == "single" else 2


def group_size(p: int, n: int, v: int) -> int:
    """g: items per interleaving group.

    v = 1: one micro-batch per group (g = n; grouping does not change the order). v > 1: the smallest
    divisor of n that is ≥ p (SlimPipe's cycles), else the smallest multiple of n that is ≥ p (whole
    micro-batches per group, Megatron's rule when n = 1).
    """
    if v == 1:
        return n
    for g in range(p, n + 1):
        if n % g == 0:
            return g
    return -(-p // n) * n


def _groups(m: int, n: int, g: int) -> list[list[tuple[int, int]]]:
    items = [(mb, j) for mb in range(m) for j in range(n)]  # flattened (micro-batch, slice)
    return [items[i : i + g] for i in range(0, len(items), g)]


def _orders(r: int, p: int, m: int, n: int, v: int, g: int) -> tuple[list[Action], list[Action]]:
    """(forward order, backward order) of rank r's units."""
    groups = _groups(m, n, g)
    fwd = [Action(k * p + r, Kind.F, mb, j) for grp in groups for k in range(v) for mb, j in grp]
    # Groups FIFO by micro-batch; a micro-batch's own groups (cycles) last-first.
    bwd_groups = sorted(groups, key=lambda grp: (grp[0][0], -grp[0][1]))
    bwd = [
        Action(k * p + r, Kind.B, mb, j)
        for grp in bwd_groups
        for k in reversed(range(v))
        for mb, j in sorted(grp, key=lambda it: (it[0], -it[1]))
    ]
    return fwd, bwd


def _interleave(fwd: list[Action], bwd: list[Action], target: int) -> list[Action]:
    """SlimPipe's in-flight loop: warm-up (forwards only), steady 1F1B, cool-down (backwards only)."""
    out: list[Action] = []
    fi = bi = inflight = 0
    while fi < len(fwd) or bi < len(bwd):
        if fi < len(fwd) and inflight < target:
            out.append(fwd[fi])
            fi += 1
            inflight += 1
        if bi < len(bwd) and (fi == len(fwd) or inflight >= target):
            out.append(bwd[bi])
            bi += 1
            inflight -= 1
    return out


def slice_1f1b(
    *, name: str, p: int, m: int, n: int, v: int, w: int | None, g: int | None = None,
    slice_weights: Sequence[float] | None = None,
) -> Schedule:
    """The one loop behind every builder; ``w=None`` means no steady state (GPipe: T = ∞)."""
    g = group_size(p, n, v) if g is None else g
    ranks = []
    for r in range(p):
        fwd, bwd = _orders(r, p, m, n, v, g)
        if w is None:
            target = len(fwd)
        else:
            first = bwd[0]
            dep = fwd.index(Action(first.stage, Kind.F, first.microbatch, first.seq_slice))
            target = min(len(fwd), dep + 1 + w * (p - 1 - r))
        ranks.append(tuple(_interleave(fwd, bwd, target)))
    weights = None if slice_weights is None else tuple(float(x) for x in slice_weights)
    return Schedule(
        name=name, num_ranks=p, virtual_stages=v, num_microbatches=m, num_slices=n,
        ranks=tuple(ranks), slice_weights=weights, meta=ScheduleMeta(w=w, g=g),
    )


def _check_counts(p: int, m: int, n: int, v: int) -> None:
    for flag, val in (("--pp", p), ("--microbatches", m), ("--slices", n), ("--vpp", v)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{flag}={val!r} must be a positive integer")


def _check_warmup_fits(name: str, p: int, m: int, n: int, v: int, w: int) -> None:
    # The steady state needs the warm-up to fit in the work: (m−1)·n·v ≥ w·(p−1) (the authors' assert,
    # generalised to w). Below that the loop degenerates into GPipe's order with GPipe's memory.
    if (m - 1) * n * v < w * (p - 1):
        need_m = 1 + -(-w * (p - 1) // (n * v))
        raise ConfigError(
            f"{name} needs (m−1)·n·v ≥ w·(p−1) for its warm-up, got m={m}, n={n}, v={v}, w={w}, p={p}: "
            f"use ≥ {need_m} micro-batches, more slices, or --schedule gpipe"
        )


def _interleaved_warmup(name: str, warmup: str, p: int, m: int, n: int, v: int) -> int:
    """w for an interleaved (v > 1) builder: the double warm-up only when every group is full.

    With a partial last group (m·n not a multiple of g) the wrap-around hop from rank p−1 to rank 0 has
    only the short group as slack, and the double warm-up can deadlock (the dry run finds a cycle, e.g.
    p=8 m=10 n=1 v=2: rank 0's last forward needs rank 7's, which waits behind a backward that needs
    rank 0's first backward). The single warm-up never does. So auto falls back to single there, and an
    explicit double is refused.
    """
    w = warmup_factor(warmup, v, n)
    if w == 2 and v > 1 and (m * n) % group_size(p, n, v) != 0:
        if warmup == "auto":
            return 1
        g = group_size(p, n, v)
        raise ConfigError(
            f"{name} --warmup double needs full interleaving groups (m·n a multiple of g={g}), got "
            f"m={m}, n={n}: with a partial last group it can deadlock; use --warmup single (or auto), or "
            f"m a multiple of {g // n}"
        )
    return w


def _slimpipe(p: int, m: int, n: int = 1, v: int = 1, warmup: str = "auto",
              slice_weights: Sequence[float] | None = None) -> Schedule:
    w = _interleaved_warmup("slimpipe", warmup, p, m, n, v)
    _check_warmup_fits("slimpipe", p, m, n, v, w)
    return slice_1f1b(name="slimpipe", p=p, m=m, n=n, v=v, w=w, slice_weights=slice_weights)


def _one_f_one_b(p: int, m: int, n: int = 1, v: int = 1, warmup: str = "auto",
                 slice_weights: Sequence[float] | None = None) -> Schedule:
    if n != 1 or v != 1:
        raise ConfigError(
            f"1f1b is unsliced and non-interleaved (got slices={n}, vpp={v}): use --schedule slimpipe "
            "for slices or interleaved-1f1b for vpp > 1"
        )
    w = warmup_factor(warmup, v)
    # No warm-up check: like Megatron, 1F1B caps its warm-up at m (m < p runs GPipe's order).
    return slice_1f1b(name="1f1b", p=p, m=m, n=1, v=1, w=w)


def _interleaved(p: int, m: int, n: int = 1, v: int = 2, warmup: str = "auto",
                 slice_weights: Sequence[float] | None = None) -> Schedule:
    if n != 1:
        raise ConfigError(
            f"interleaved-1f1b is unsliced (got slices={n}): use --schedule slimpipe with --vpp for "
            "interleaved slicing"
        )
    w = _interleaved_warmup("interleaved-1f1b", warmup, p, m, 1, v)
    _check_warmup_fits("interleaved-1f1b", p, m, 1, v, w)
    return slice_1f1b(name="interleaved-1f1b", p=p, m=m, n=1, v=v, w=w)


def _seq1f1b(p: int, m: int, n: int = 1, v: int = 1, warmup: str = "auto",
             slice_weights: Sequence[float] | None = None) -> Schedule:
    if v != 1:
        raise ConfigError(f"seq1f1b is non-interleaved here (got vpp={v}): use --vpp 1, or slimpipe")
    if slice_weights is not None:
        if len(slice_weights) != n or min(slice_weights) <= 0 or abs(sum(slice_weights) - 1) > 1e-9:
            raise ConfigError(
                f"seq1f1b slice_weights must be {n} positive fractions summing to 1, got {slice_weights}"
            )
    # Seq1F1B's own warm-up p − r − 1 + (k − 1) is the single one; auto keeps it.
    w = 1 if warmup == "auto" else warmup_factor(warmup, v)
    _check_warmup_fits("seq1f1b", p, m, n, 1, w)
    return slice_1f1b(name="seq1f1b", p=p, m=m, n=n, v=1, w=w, slice_weights=slice_weights)


def _gpipe(p: int, m: int, n: int = 1, v: int = 1, warmup: str = "auto",
           slice_weights: Sequence[float] | None = None) -> Schedule:
    warmup_factor(warmup, v)  # validate the name; GPipe has no steady state
    return slice_1f1b(name="gpipe", p=p, m=m, n=n, v=v, w=None)


BUILDERS: dict[str, Callable[..., Schedule]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved-1f1b": _interleaved,
    "seq1f1b": _seq1f1b,
    "slimpipe": _slimpipe,
}


def build(
    name: str, *, p: int, m: int, n: int = 1, v: int = 1, warmup: str = "auto",
    slice_weights: Sequence[float] | None = None,
) -> Schedule:
    """Build the named schedule for p ranks, m micro-batches, n slices, v virtual stages.

    >>> str(build("slimpipe", p=2, m=2, n=2).ranks[0][0])
    '0F0.0'
    """
    if name not in BUILDERS:
        raise ConfigError(f"--schedule {name!r} is unknown: use one of {', '.join(BUILDERS)}")
    _check_counts(p, m, n, v)
    return BUILDERS[name](p, m, n, v, warmup, slice_weights)
