"""Token corpora beyond flat .bin files: memory-mapped .npy arrays, and text/JSONL tokenized once and cached.

* ``.npy``: a 1-D integer array, opened with ``mmap_mode="r"`` (never read whole; ids are checked in
  blocks like a .bin file).
* Text with ``--tokenizer DIR`` (a Hugging Face tokenizer directory: ``tokenizer.json`` plus
  ``tokenizer_config.json`` naming the EOS token): a ``.jsonl`` file is one document per line, its text in
  ``--text-field`` (default ``text``); any other file is one document. Documents are tokenized with the
  ``tokenizers`` library (no special tokens added) and joined with EOS after each document. The result is
  cached next to the data as ``<data>.<key>.tokens.npy`` (key: a hash of the tokenizer file, its EOS
  token, the text field and the data file's size and mtime) with the document start offsets in ``<key>.docs.npy``; a
  second run memory-maps the cache. The cache is written under a temporary name and renamed, so
  concurrent runs (torchrun ranks) never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slimpipe.config import ConfigError

__all__ = ["open_npy", "tokenize_corpus", "load_tokenizer", "cache_paths", "check_ids"]

_BATCH_DOCS = 256  # documents per encode_batch call


def check_ids(tokens: np.ndarray, vocab_size: int, spec: str) -> None:
    """Every id < vocab_size, scanned in blocks (a token file can be far larger than memory)."""
    if len(tokens) == 0:
        return
    top = max(int(tokens[i : i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
    if top >= vocab_size:
        raise ConfigError(
            f"--data {spec}: token id {top} ≥ the model's vocab_size={vocab_size}: use a model whose vocab "
            f"covers the tokenizer (vocab_size ≥ {top + 1}) or check --data-dtype/--tokenizer"
        )


def open_npy(path: Path, vocab_size: int) -> np.ndarray:
    """A memory-mapped 1-D integer .npy token array, checked against the vocabulary."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--data {path}: not a readable .npy array ({exc}); save tokens with numpy.save") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ConfigError(
            f"--data {path}: a {tokens.ndim}-D {tokens.dtype} array; expected a flat (1-D) integer token array"
        )
    if tokens.dtype.kind == "i" and len(tokens) and int(min(tokens[i : i + (1 << 24)].min()
                                                            for i in range(0, len(tokens), 1 << 24))) < 0:
        raise ConfigError(f"--data {path}: negative token ids; expected ids in [0, vocab_size)")
    check_ids(tokens, vocab_size, str(path))
    return tokens


def load_tokenizer(directory: str) -> tuple[object, int]:
    """(tokenizers.Tokenizer, EOS id) from a Hugging Face tokenizer directory."""
    root = Path(directory)
    file = root / "tokenizer.json" if root.is_dir() else root
    if not file.is_file():
        raise ConfigError(f"--tokenizer {directory}: no tokenizer.json; give a Hugging Face tokenizer directory")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("--tokenizer needs the tokenizers package: pip install 'slimpipe[hf]'") from None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception on a bad file
        raise ConfigError(f"--tokenizer {file}: cannot load ({str(exc).splitlines()[0]}); re-save it") from None
    eos = _eos_token(file.parent)
    eos_id = None if eos is None else tok.token_to_id(eos)
    if eos_id is None:
        raise ConfigError(
            f"--tokenizer {directory}: no EOS token ({'none named' if eos is None else repr(eos) + ' not in the vocabulary'}"
            " in tokenizer_config.json); documents need one between them: add \"eos_token\" to tokenizer_config.json"
        )
    return tok, eos_id


def _eos_token(root: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = json.loads((root / name).read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def cache_paths(data: Path, tokenizer_dir: str, text_field: str) -> tuple[Path, Path]:
    """(tokens cache, document offsets cache) next to ``data``."""
    tok_file = Path(tokenizer_dir)
    tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
    if not tok_file.is_file():
        raise ConfigError(f"--tokenizer {tokenizer_dir}: no tokenizer.json; give a Hugging Face tokenizer directory")
    eos = _eos_token(tok_file.parent)
    if eos is None:
        raise ConfigError(
            f"--tokenizer {tokenizer_dir}: no EOS token named in tokenizer_config.json; documents need one "
            "between them: add \"eos_token\" to tokenizer_config.json"
        )
    st = data.stat()
    h = hashlib.sha256(tok_file.read_bytes())
    h.update(f"{eos}|{text_field}|{st.st_size}|{st.st_mtime_ns}".encode())
    key = h.hexdigest()[:12]
    return data.with_name(f"{data.name}.{key}.tokens.npy"), data.with_name(f"{data.name}.{key}.docs.npy")


def _documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(
                    f"--data {path}:{lineno}: not a JSON object with a string field {text_field!r}; "
                    "fix the line or pass --text-field"
                ) from None
            if not isinstance(text, str):
                raise ConfigError(f"--data {path}:{lineno}: field {text_field!r} is not a string")
            yield text


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_corpus(path: Path, tokenizer_dir: str, text_field: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document start offsets), memory-mapped from the cache; tokenized and cached on first use."""
    tokens_path, docs_path = cache_paths(path, tokenizer_dir, text_field)
    if not (tokens_path.is_file() and docs_path.is_file()):
        tok, eos = load_tokenizer(tokenizer_dir)
        dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
        _write_cache(path, tok, eos, text_field, dtype, tokens_path, docs_path)
    tokens = np.load(tokens_path, mmap_mode="r")
    check_ids(tokens, vocab_size, str(path))
    return tokens, np.load(docs_path)


def _write_cache(path: Path, tok, eos: int, text_field: str, dtype, tokens_path: Path, docs_path: Path) -> None:
    """Stream the documents through the tokenizer into a raw temp file, then write the two .npy files."""
    tmp = tokens_path.with_name(f"{tokens_path.name}.{os.getpid()}.tmp")
    starts, total = [], 0
    try:
        with open(tmp, "wb") as raw:
            for batch in _batches(_documents(path, text_field)):
                for enc in tok.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(enc.ids + [eos], dtype=dtype)
                    starts.append(total)
                    total += len(ids)
                    raw.write(ids.tobytes())
        flat = np.memmap(tmp, dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)
        out = np.lib.format.open_memmap(f"{tokens_path}.{os.getpid()}.npy", mode="w+", dtype=dtype, shape=(total,))
        for i in range(0, total, 1 << 24):
            out[i : i + (1 << 24)] = flat[i : i + (1 << 24)]
        out.flush()
        del out, flat
        np.save(f"{docs_path}.{os.getpid()}.npy", np.asarray(starts, dtype=np.int64))
        os.replace(f"{docs_path}.{os.getpid()}.npy", docs_path)
        os.replace(f"{tokens_path}.{os.getpid()}.npy", tokens_path)
    except OSError as exc:
        raise ConfigError(f"--data {path}: cannot write the token cache next to it ({exc.strerror}); make the directory writable") from None
    finally:
        tmp.unlink(missing_ok=True)
