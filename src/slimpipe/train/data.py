"""Training data: a flat token array and a seed-only sampler. Imports numpy, not torch.

The global batch of step k is ``B`` windows of ``s + 1`` tokens whose offsets are drawn from a generator
seeded by ``(seed, k)`` only, so every parallel layout (pp, dp, vpp, slices, schedule) sees the same
sequences in the same order, and a resumed run needs nothing but the step number to continue. Data-parallel
replica d takes sequences ``[d·m, (d+1)·m)`` of it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimpipe.config import ConfigError
from slimpipe.sim.documents import DocLengths, stdlib_files
from slimpipe.train.corpus import check_ids, open_npy, tokenize_corpus

__all__ = ["TokenData", "load_data", "stdlib_corpus", "stdlib_documents"]


@dataclass(frozen=True, slots=True)
class TokenData:
    """A token source: a flat array (text, token file) or a generated pattern (synthetic)."""

    name: str
    """What was loaded, for logs (path, 'stdlib', 'synthetic')."""
    tokens: np.ndarray | None
    """Flat token ids (uint8/uint16/uint32, possibly a memmap); None for synthetic data."""
    vocab_size: int
    """Vocabulary size the ids were checked against."""
    fingerprint: str
    """Short content hash stored in checkpoints so a resume on other data is refused."""
    docs: np.ndarray | None = None
    """Start offset of every document in ``tokens`` (tokenized text), or None when unknown."""

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens is None else len(self.tokens)

    def batch(self, step: int, *, seed: int, batch: int, seq_len: int) -> np.ndarray:
        """The global batch of ``step``: (B, s + 1) int64 token ids."""
        rng = np.random.default_rng([seed, step])
        if self.tokens is None:
            return _synthetic(rng, batch, seq_len, self.vocab_size, seed)
        starts = self._offsets(step, seed=seed, batch=batch, seq_len=seq_len)
        return np.stack([np.asarray(self.tokens[o : o + seq_len + 1], dtype=np.int64) for o in starts])

    def _offsets(self, step: int, *, seed: int, batch: int, seq_len: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, self.num_tokens - seq_len, size=batch)  # window s+1 fits

    def batch_documents(self, step: int, *, seed: int, batch: int, seq_len: int) -> np.ndarray:
        """(B, s + 1) document index of every token of ``batch(step)``'s windows (packed documents)."""
        return self._documents(self._offsets(step, seed=seed, batch=batch, seq_len=seq_len), seq_len)

    def window_documents(self, first: int, count: int, seq_len: int) -> np.ndarray:
        """(count, S + 1) document index of every token of ``windows(first, count)``."""
        return self._documents(np.arange(first, first + count) * seq_len, seq_len)

    def doc_lengths(self) -> DocLengths:
        """The distribution of the data's document lengths (the simulator's --doc-lengths)."""
        assert self.docs is not None, "the data has no document boundaries"
        lengths, counts = np.unique(np.diff(np.append(self.docs, self.num_tokens)), return_counts=True)
        return DocLengths(self.name, tuple(int(x) for x in lengths), tuple(float(c) / counts.sum() for c in counts))

    def _documents(self, offsets: np.ndarray, seq_len: int) -> np.ndarray:
        assert self.docs is not None, "the data has no document boundaries"
        pos = offsets[:, None] + np.arange(seq_len + 1)[None, :]
        return np.searchsorted(self.docs, pos, side="right").astype(np.int64) - 1


    def eval_windows(self, seq_len: int) -> int:
        """K = ⌊(N − 1)/S⌋: the non-overlapping windows of an evaluation (window k is
        tokens[k·S : k·S + S + 1]: inputs its first S tokens, labels its last S)."""
        if self.tokens is None:
            raise ConfigError("--data synthetic has no fixed token sequence to evaluate: give a token or text file")
        return (self.num_tokens - 1) // seq_len

    def windows(self, first: int, count: int, seq_len: int) -> np.ndarray:
        """Windows first … first + count − 1 as (count, S + 1) int64 ids."""
        assert self.tokens is not None
        rows = [self.tokens[k * seq_len : k * seq_len + seq_len + 1] for k in range(first, first + count)]
        return np.stack([np.asarray(r, dtype=np.int64) for r in rows])


def _synthetic(rng: np.random.Generator, batch: int, seq_len: int, vocab: int, seed: int) -> np.ndarray:
    """Walks of a fixed random permutation: token i+1 = perm[token i]; learnable from the previous token."""
    perm = np.random.default_rng([seed, 1 << 30]).permutation(vocab)
    out = np.empty((batch, seq_len + 1), dtype=np.int64)  # (B, s+1)
    out[:, 0] = rng.integers(0, vocab, size=batch)
    for i in range(seq_len):
        out[:, i + 1] = perm[out[:, i]]
    return out


def stdlib_corpus() -> tuple[np.ndarray, str]:
    """Bytes of the sorted .py files of this Python's standard library (offline, same on every run)."""
    blob = b"\n".join(f.read_bytes() for f in stdlib_files())
    return np.frombuffer(blob, dtype=np.uint8), sysconfig.get_paths()["stdlib"]


def stdlib_documents() -> np.ndarray:
    """Start offset of every file of stdlib_corpus() (a document: its bytes and the joining newline)."""
    sizes = [f.stat().st_size + 1 for f in stdlib_files()]
    return np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)


def load_data(spec: str, *, vocab_size: int, seq_len: int, data_dtype: str = "auto", tokenizer: str = "",
              text_field: str = "text", eod_id: int = -1, need_documents: bool = False) -> TokenData:
    """Load and check a data spec; every problem is a ConfigError naming the fix.

    .bin: flat uint16/uint32 ids; .npy: a 1-D integer array (memory-mapped); with ``tokenizer`` any other
    file is text (.jsonl: one document per line) tokenized once and cached (slimpipe.train.corpus);
    without it, bytes. Document boundaries (``docs``): tokenized text's documents, the stdlib corpus'
    files, or the positions after every ``eod_id`` token; ``need_documents`` (--pack-documents) refuses
    data without them."""
    docs = None
    if spec == "synthetic":
        if need_documents:
            raise ConfigError("--pack-documents needs data with document boundaries: give tokenized text, "
                              "stdlib, or a token file with --eod-id (synthetic has none)")
        return TokenData("synthetic", None, vocab_size, "synthetic")
    if spec == "stdlib":
        tokens, root = stdlib_corpus()
        docs = stdlib_documents()
        name = f"stdlib ({root}, {len(tokens) / 1e6:.1f} MB)"
        _check_bytes(vocab_size, spec)
    else:
        path = Path(spec)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise ConfigError(f"--data {spec}: {what}; give a .bin token file, a text file, stdlib or "
                              "synthetic")
        if path.stat().st_size == 0:
            raise ConfigError(f"--data {spec}: the file is empty; give a file with at least seq_len+1 tokens")
        if path.suffix == ".bin":
            tokens = _token_file(path, vocab_size, data_dtype)
        elif path.suffix == ".npy":
            tokens = open_npy(path, vocab_size)
        elif tokenizer:
            tokens, docs = tokenize_corpus(path, tokenizer, text_field, vocab_size)
        else:
            _check_bytes(vocab_size, spec)
            tokens = np.memmap(path, dtype=np.uint8, mode="r")
        name = str(path)
    if len(tokens) < seq_len + 1:
        raise ConfigError(
            f"--data {spec}: has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}: "
            "use more data or a shorter --seq-len"
        )
    if eod_id >= 0:
        docs = _eod_documents(tokens, eod_id)
    if need_documents and docs is None:
        raise ConfigError(f"--pack-documents: --data {spec} has no document boundaries; give tokenized text "
                          "(--tokenizer), stdlib, or a .bin/.npy token file with --eod-id ID")
    return TokenData(name, tokens, vocab_size, _fingerprint(tokens), docs)


def _eod_documents(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Start offsets of the documents of a token array whose documents each end with ``eod_id`` (scanned
    in blocks: a memory-mapped file is never read whole)."""
    starts = [np.zeros(1, dtype=np.int64)]
    block = 1 << 24
    for lo in range(0, len(tokens), block):
        ends = np.flatnonzero(np.asarray(tokens[lo : lo + block]) == eod_id) + lo + 1
        starts.append(ends[ends < len(tokens)].astype(np.int64))
    return np.concatenate(starts)


def _check_bytes(vocab_size: int, spec: str) -> None:
    if vocab_size < 256:
        raise ConfigError(
            f"--data {spec} is read as bytes (ids 0..255) but the model's vocab_size={vocab_size}: "
            "use a model with vocab_size ≥ 256 or a .bin token file"
        )


def _token_file(path: Path, vocab_size: int, data_dtype: str) -> np.ndarray:
    if data_dtype == "auto":
        data_dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    dtype = np.dtype(data_dtype)
    if path.stat().st_size % dtype.itemsize:
        raise ConfigError(
            f"--data {path}: size {path.stat().st_size} B is not a multiple of {dtype.itemsize} "
            f"({data_dtype}); pass the right --data-dtype (uint16 or uint32)"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")
    check_ids(tokens, vocab_size, str(path))
    return tokens


def _fingerprint(tokens: np.ndarray) -> str:
    """Hash of the length and up to 4 MiB from each end (cheap even for huge files)."""
    h = hashlib.sha256(str(len(tokens)).encode())
    h.update(np.ascontiguousarray(tokens[: 1 << 21]).tobytes())
    h.update(np.ascontiguousarray(tokens[-(1 << 21) :]).tobytes())
    return h.hexdigest()[:16]
