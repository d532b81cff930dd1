"""Packed documents through slices: which (query, key) pairs document-causal attention computes, for the
runtime (the spans its kernels run over) and the simulator (expected per-slice work for a document-length
distribution). Imports no torch.

A packed row of s tokens holds documents back to back; ``starts`` are their first positions (starts[0] = 0).
Token i attends to keys [doc_start(i), i]. For slice j (queries [start, end)) that means:

* the **carry-in** document (the one holding ``start``, begun at D ≤ start) is the only one that sees
  earlier slices: its rows [start, c) attend to keys [D, start) **unmasked** (every such key precedes
  every such query and lies in their document), then to their own keys causally;
* every other document of the slice, [a, b), attends to keys [a, b) causally and to nothing else.

So a slice never touches a prefix key before D, nor a prefix key from a row outside the carry-in document:
every kernel call is either an unmasked rectangle or a square causal block (no mask is materialised), and
the work is ``(c − start)·(start − D)`` prefix pairs plus ``Σ L²/2`` diagonal pairs (the cost model's T²/2
convention: one document covering the whole row gives exactly the causal ``T·P + T²/2``).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import os
import random
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slimpipe.config import ConfigError

__all__ = ["SliceSpans", "slice_spans", "DocLengths", "parse_doc_lengths", "expected_slice_pairs",
           "slice_pairs", "causal_slice_pairs", "stdlib_files"]


@dataclass(frozen=True, slots=True)
class SliceSpans:
    """The documents of one slice's queries [start, end) of a packed row (row positions)."""

    start: int
    end: int
    carry: int
    """D: where the carry-in document (the one holding ``start``) begins; keys [D, start) are its prefix."""
    cuts: tuple[int, ...]
    """Document boundaries within the slice, local: (0, …, end − start); segment k is [cuts[k], cuts[k+1])."""

    @property
    def carry_rows(self) -> int:
        """Rows [0, carry_rows) (local) belong to the carry-in document and see the prefix [D, start)."""
        return self.cuts[1]

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Local [a, b) of every document in the slice, in order."""
        return list(zip(self.cuts, self.cuts[1:]))

    def pairs(self) -> tuple[float, float]:
        """(prefix pairs, diagonal pairs): (c − start)·(start − D) and Σ L²/2 (the cost model's units)."""
        return (self.carry_rows * (self.start - self.carry),
                sum((b - a) ** 2 for a, b in self.segments) / 2)


def slice_spans(starts: Sequence[int], start: int, end: int) -> SliceSpans:
    """The spans of slice [start, end) of a row whose documents begin at ``starts`` (sorted, starts[0] = 0)."""
    i = bisect.bisect_right(starts, start) - 1
    inner = starts[i + 1 : bisect.bisect_left(starts, end)]
    return SliceSpans(start, end, starts[i], (0, *(x - start for x in inner), end - start))


def slice_pairs(seq_len: int, slice_fractions: Sequence[float],
                docs: DocLengths | None) -> list[tuple[float, float]]:
    """(prefix, diagonal) pairs of each slice of one sequence (the cost model's attention): (T·P, T²/2)
    for one causal sequence; with ``docs`` the mean over 512 sampled packed rows (fixed seed)."""
    tokens = [seq_len * w for w in slice_fractions]
    if docs is None:
        return [(t * sum(tokens[:j]), t * t / 2) for j, t in enumerate(tokens)]
    bounds = [round(seq_len * sum(slice_fractions[:j])) for j in range(len(slice_fractions))] + [seq_len]
    return expected_slice_pairs(docs, bounds)


def causal_slice_pairs(bounds: Sequence[int]) -> list[tuple[float, float]]:
    """(prefix, diagonal) pairs of each slice without documents: (T·P, T²/2)."""
    return [(float((e - s) * s), (e - s) ** 2 / 2) for s, e in zip(bounds, bounds[1:])]


@dataclass(frozen=True, slots=True)
class DocLengths:
    """A document-length distribution: lengths in tokens and their probabilities (documents drawn i.i.d.)."""

    name: str
    """How it was given (for reports)."""
    lengths: tuple[int, ...]
    """Document lengths, tokens (≥ 1)."""
    weights: tuple[float, ...]
    """Probability of each length (sums to 1)."""

    @property
    def mean(self) -> float:
        return sum(n * w for n, w in zip(self.lengths, self.weights))

    def sample_rows(self, seq_len: int, rows: int, seed: int = 0) -> list[list[int]]:
        """Document starts of ``rows`` packed rows of ``seq_len`` tokens: windows at uniformly random offsets
        of an endless stream of documents (what the trainer's sampler cuts from a packed corpus), so the
        first document is a length-biased draw cut at a uniform point."""
        return [list(r) for r in _sample_rows(self, seq_len, rows, seed)]


@functools.lru_cache(maxsize=64)
def _sample_rows(docs: DocLengths, seq_len: int, rows: int, seed: int) -> tuple[tuple[int, ...], ...]:
    rng = random.Random(seed)
    biased = list(itertools.accumulate(n * w for n, w in zip(docs.lengths, docs.weights)))
    plain = list(itertools.accumulate(docs.weights))
    out = []
    for _ in range(rows):
        first = rng.choices(docs.lengths, cum_weights=biased)[0]
        pos, starts = first - rng.randrange(first), [0]  # the first document's remaining tokens
        while pos < seq_len:
            starts.append(pos)
            pos += rng.choices(docs.lengths, cum_weights=plain)[0]
        out.append(tuple(starts))
    return tuple(out)


def expected_slice_pairs(docs: DocLengths, bounds: Sequence[int], *, rows: int = 512,
                         seed: int = 0) -> list[tuple[float, float]]:
    """Mean (prefix, diagonal) pairs of each slice over ``rows`` sampled packed rows (deterministic; cached:
    the planner asks for the same ones for every candidate layout)."""
    return list(_expected(docs, tuple(bounds), rows, seed))


@functools.lru_cache(maxsize=256)
def _expected(docs: DocLengths, bounds: tuple[int, ...], rows: int, seed: int) -> tuple[tuple[float, float], ...]:
    acc = [[0.0, 0.0] for _ in bounds[1:]]
    for starts in _sample_rows(docs, bounds[-1], rows, seed):
        for j, (s, e) in enumerate(zip(bounds, bounds[1:])):
            p, d = slice_spans(starts, s, e).pairs()
            acc[j][0] += p
            acc[j][1] += d
    return tuple((p / rows, d / rows) for p, d in acc)


def stdlib_files() -> list[Path]:
    """The sorted .py files of this Python's standard library (test suites and third-party code left out):
    the ``stdlib`` corpus, one document per file."""
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def parse_doc_lengths(spec: str) -> DocLengths:
    """``--doc-lengths``: ``N[:W],N[:W],…`` (lengths with optional relative weights), ``@FILE`` (one length
    per line, e.g. a corpus' measured document lengths), or ``stdlib`` (the byte lengths of the stdlib
    corpus' files + 1 separator). One ConfigError line for anything else."""
    flag = f"--doc-lengths {spec!r}"
    if spec == "stdlib":
        return DocLengths("stdlib", *_histogram([f.stat().st_size + 1 for f in stdlib_files()]))
    if spec.startswith("@"):
        try:
            values = [int(x) for x in Path(spec[1:]).read_text().split()]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{flag}: unreadable ({exc}); give a file of integers, one per line") from None
        if not values or min(values) < 1:
            raise ConfigError(f"{flag}: needs positive lengths, one per line")
        return DocLengths(spec, *_histogram(values))
    lengths, weights = [], []
    for item in spec.split(","):
        n, _, w = item.strip().partition(":")
        try:
            lengths.append(int(n))
            weights.append(float(w) if w else 1.0)
        except ValueError:
            raise ConfigError(f"{flag}: write lengths with optional weights, e.g. 512:0.6,4096:0.3,65536:0.1, "
                              "or @FILE, or stdlib") from None
    if min(lengths) < 1 or min(weights) < 0 or not math.isfinite(sum(weights)) or sum(weights) <= 0:
        raise ConfigError(f"{flag}: lengths must be ≥ 1 and weights ≥ 0 with a positive sum")
    total = sum(weights)
    return DocLengths(spec, tuple(lengths), tuple(w / total for w in weights))


def _histogram(values: list[int]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    keys = sorted(counts)
    return tuple(keys), tuple(counts[k] / len(values) for k in keys)
