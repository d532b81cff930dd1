"""The layout rules every command applies: what simulate, plot, plan, show and train refuse. No torch.

One place, so the simulator never prints figures for a layout the runtime or the planner would refuse.
Each rule comes twice: a ``*_problem`` function returning None or the one-line fix (cheap; the planner's
enumeration filters with it) and a ``check_*`` raising the ConfigError every command prints.

Where a parallelism adds a constraint (TP: heads, K/V heads, FFN and vocabulary by t; CP: the sequence by
2·c·n, SP's t on top), it goes here, and every command refuses the same layouts.
"""

from __future__ import annotations

from slimpipe.config import ConfigError, ModelConfig, ParallelConfig

__all__ = [
    "check_model", "tp_problem", "sequence_problem", "expert_problem", "check_layout", "estimated_actions", "check_size",
    "exchange_problem", "check_exchange", "MAX_ACTIONS",
]

MAX_ACTIONS = 2_000_000
"""Default cap on a schedule's estimated lowered actions (``estimated_actions``). `slimpipe simulate` handles
~600K actions/s at ~200 B each on one core (measured: p4 n4 m20000, 1.6M actions in 2.6 s and 330 MB;
p8 n8 m2048, 721K in 1.4 s), so the cap keeps one command to a few seconds and ~400 MB; ``--max-actions``
raises it."""
_ACTIONS_PER_S, _BYTES_PER_ACTION = 600e3, 200


def check_model(model: ModelConfig) -> None:
    """Rules on the model alone that the runtime needs (RoPE rotates pairs of channels)."""
    if model.head_dim % 2:
        raise ConfigError(
            f"model.head_dim={model.head_dim} is odd: RoPE rotates pairs of channels; use an even head_dim"
        )


def tp_problem(model: ModelConfig, t: int, *, vocab_parallel: bool = False) -> str | None:
    """Tensor parallelism shards heads, K/V heads (Megatron's query groups), the FFN and the vocabulary
    over t ranks: each must be a multiple of t. With vocabulary parallelism the vocabulary is cut over t·p
    with padding rows instead (runtime/vocab.py), so it need not divide."""
    if t == 1:
        return None
    sizes = [("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads), ("ffn", model.ffn)]
    if not vocab_parallel:
        sizes.append(("vocab_size", model.vocab_size))
    for field, size in sizes:
        if size % t:
            divisors = [k for k in range(1, min(size, 64) + 1) if all(v % k == 0 for _, v in sizes)]
            return (f"--tp={t} does not divide {field}={size} of {model.name}: tensor parallelism shards it "
                    f"over t ranks; use --tp in {divisors}")
    return None


def sequence_problem(seq_len: int, n: int, t: int = 1, c: int = 1) -> str | None:
    """A sequence cuts into n equal slices; context parallelism cuts each slice into 2c zig-zag pieces and
    sequence parallelism shards a piece's tokens over t, so s must be a multiple of n·t·(2c if c > 1).
    The fix names the nearest valid seq-len and, where one exists, the nearest slice count that works."""
    shard = t * (2 * c if c > 1 else 1)
    if c > 1 and seq_len < shard:
        of = " of t shards" if t > 1 else ""
        return (f"--cp={c} needs at least {shard} tokens (2c zig-zag pieces{of}) but --seq-len={seq_len}: "
                f"use --cp ≤ {max(1, seq_len // (2 * t))} or --seq-len ≥ {n * shard}")
    if seq_len % n:
        return (f"--seq-len={seq_len} is not divisible by --slices={n}: use a seq-len that is a multiple of "
                f"{n} (e.g. {seq_len - seq_len % n or n}) or a slice count dividing it")
    if (seq_len // n) % shard:
        unit = n * shard
        parts = (f"n={n}", f"2c={2 * c}" if c > 1 else "", f"t={t}" if t > 1 else "")
        what = " · ".join(x for x in parts if x)
        why = ("context parallelism cuts each slice into 2c zig-zag pieces" if c > 1 else "")
        why += ("; " if why and t > 1 else "") + ("sequence parallelism shards them over t" if t > 1 else "")
        near = max(unit, unit * round(seq_len / unit))
        counts = _divisors(seq_len // shard) if seq_len % shard == 0 else []
        alt = f", or --slices {min(counts, key=lambda k: (abs(k - n), k))}" if counts else ""
        return (f"--seq-len={seq_len} is not a multiple of {what} = {unit} ({why}): use a seq-len that is a "
                f"multiple of {unit} (nearest: {near}){alt}")
    return None


def expert_problem(model: ModelConfig, par: ParallelConfig) -> str | None:
    """Expert parallelism (MoE only): e divides E, and the expert groups (expert-TP × e GPUs) live inside the
    t·c·d GPUs of one pipeline stage — with the default expert-TP = t, e divides c·d (Megatron's layout);
    expert-TP divides f."""
    if model.num_experts == 1:
        if par.ep > 1:
            return f"--ep={par.ep} needs an MoE model (model {model.name!r} is dense): use --ep 1"
        if par.expert_tp != par.tp:
            return f"--etp={par.etp} needs an MoE model (model {model.name!r} is dense): drop --etp"
        return None
    if model.num_experts % par.ep:
        return f"--ep={par.ep} does not divide num_experts={model.num_experts}: pick a divisor of it"
    etp, tcd = par.expert_tp, par.tp * par.cp * par.dp
    if tcd % (etp * par.ep):
        fix = ("use an --ep dividing cp·dp, or --etp 1 to let the expert group span the TP ranks"
               if etp > 1 else "change --ep or --dp")
        return (f"--ep={par.ep} × expert-TP {etp} must divide tp·cp·dp={tcd} (the expert groups live inside the "
                f"GPUs of one pipeline stage): {fix}")
    if model.ffn % etp:
        return f"model.ffn={model.ffn} is not divisible by expert-TP {etp}: use --etp 1 or another --tp"
    return None


def _divisors(x: int) -> list[int]:
    small = [k for k in range(1, int(x ** 0.5) + 1) if x % k == 0]
    return sorted({*small, *(x // k for k in small)})


def check_layout(model: ModelConfig, par: ParallelConfig, seq_len: int, *, vocab_parallel: bool = False) -> None:
    """Every rule on (model, layout, sequence length); the first violation as a ConfigError."""
    check_model(model)
    par.check_layers(model.num_layers)
    for problem in (tp_problem(model, par.tp, vocab_parallel=vocab_parallel),
                    sequence_problem(seq_len, par.slices, par.tp, par.cp), expert_problem(model, par)):
        if problem:
            raise ConfigError(problem)


def estimated_actions(p: int, m: int, n: int, v: int) -> int:
    """Actions of the lowered schedule: p·v stages × m·n units × (F, B), plus a send and a receive per
    unit and direction on every stage boundary (exchange markers and vocabulary collectives excluded)."""
    units = m * n
    return 2 * p * v * units + 4 * max(0, p * v - 1) * units


def check_size(p: int, m: int, n: int, v: int, *, limit: int | None = None) -> None:
    """Refuse a schedule too large to build in seconds (``limit`` None: MAX_ACTIONS; 0: no limit)."""
    limit = MAX_ACTIONS if limit is None else limit
    if limit < 0:
        raise ConfigError(f"--max-actions={limit} must be ≥ 0 (0 = no limit)")
    actions = estimated_actions(p, m, n, v)
    if limit and actions > limit:
        raise ConfigError(
            f"p={p} m={m} n={n} v={v} is a schedule of ~{actions:,} actions, over the {limit:,} limit "
            f"(~{actions / _ACTIONS_PER_S:,.0f} s and ~{actions * _BYTES_PER_ACTION / 2**30:,.1f} GiB to build "
            "and simulate): "
            "use fewer micro-batches, slices or stages, or raise --max-actions"
        )


def exchange_problem(schedule: str, p: int, n: int, attn_balance: int) -> str | None:
    """The attention context exchange pairs concurrent equal slices of a SlimPipe schedule on ≥ 2 ranks."""
    if attn_balance and (schedule != "slimpipe" or n < 2 or p < 2):
        return (f"--attn-balance={attn_balance} needs --schedule slimpipe with --slices ≥ 2 and --pp ≥ 2 "
                f"(got {schedule}, n={n}, p={p}): use --attn-balance 0 or that schedule")
    return None


def check_exchange(schedule: str, p: int, n: int, attn_balance: int) -> None:
    problem = exchange_problem(schedule, p, n, attn_balance)
    if problem:
        raise ConfigError(problem)
