"""The documented feasibility rules, restated independently of the builders (tests compare the two).

Shared by the schedule tests; not a test module itself.
"""

from __future__ import annotations

from slimpipe.schedule.actions import Action, Schedule, parse_action

__all__ = ["group_size", "warmup_w", "must_refuse", "with_program", "act"]


def group_size(p: int, n: int, v: int) -> int:
    """g (reference §4.3): v = 1 → n; else the smallest divisor of n that is ≥ p, else the smallest
    multiple of n that is ≥ p (whole micro-batches per group, Megatron's rule at n = 1)."""
    if v == 1:
        return n
    divisors = [d for d in range(p, n + 1) if n % d == 0]
    return divisors[0] if divisors else next(k * n for k in range(1, p + 1) if k * n >= p)


def warmup_w(warmup: str, p: int, m: int, n: int, v: int) -> int | None:
    """w the builder must use, or None when the combination must be refused.

    auto = single for n = v = 1 (Megatron's 1F1B), double otherwise, unless v > 1 and the last
    interleaving group is partial (m·n not a multiple of g: the double warm-up can deadlock there), where
    auto falls back to single and an explicit double is refused. seq1f1b: auto = single (its own rule).
    """
    partial = v > 1 and (m * n) % group_size(p, n, v) != 0
    if warmup == "single":
        return 1
    if warmup == "double":
        return None if partial else 2
    return 1 if (v == 1 and n == 1) or partial else 2


def must_refuse(name: str, p: int, m: int, n: int, v: int, warmup: str = "auto") -> bool:
    """True iff build(name, ...) must raise ConfigError (docs/design.md, "Feasibility")."""
    if name == "1f1b" and (n > 1 or v > 1):
        return True
    if name == "interleaved-1f1b" and n > 1:
        return True
    if name == "seq1f1b" and v > 1:
        return True
    if name == "gpipe" or name == "1f1b":
        return False  # no steady state / Megatron caps the 1F1B warm-up at m
    w = 1 if (name == "seq1f1b" and warmup == "auto") else warmup_w(warmup, p, m, n, v)
    return w is None or (m - 1) * n * v < w * (p - 1)


def with_program(schedule: Schedule, rank: int, program: list[Action]) -> Schedule:
    """A copy of schedule with rank's program replaced (for hand-edited negative controls)."""
    ranks = list(schedule.ranks)
    ranks[rank] = tuple(program)
    return schedule.replace_ranks(tuple(ranks))


def act(text: str) -> Action:
    """Shorthand: act('1F0.2')."""
    return parse_action(text)

