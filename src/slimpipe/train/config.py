"""TrainConfig: every `slimpipe train` flag is one field here. Imports no torch.

Precedence: field defaults < ``--config FILE`` (TOML or JSON with the same keys, or the ``config.json`` a
previous run wrote) < command-line flags. The defaults are the embedded demo: a ~6M-parameter byte-level
Llama on the Python standard library's own source, 2 pipeline stages, SlimPipe with 4 slices.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from slimpipe.config import ConfigError
from slimpipe.sim.workload import RECOMPUTE_MODES

__all__ = ["TrainConfig", "load_config_file", "field_docs", "DTYPES", "DEVICES", "DATA_DTYPES", "NONFINITE",
           "DOC_POSITIONS"]

DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
DATA_DTYPES = ("auto", "uint16", "uint32")
NONFINITE = ("stop", "skip")
DOC_POSITIONS = ("document", "global")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """One training run. Field names are the flags (``seq_len`` is ``--seq-len``)."""

    # --- model and data -------------------------------------------------------------------------
    model: str = "small"
    """Model preset (tiny, small, llama-1b, ...) or a JSON file of ModelConfig fields."""
    data: str = "stdlib"
    """stdlib (byte-level text of the Python standard library's .py files), synthetic (a learnable
    pattern, for tests), a .bin token file (flat uint16/uint32), a .npy token array, text/JSONL with
    --tokenizer, or any other file read as bytes."""
    data_dtype: str = "auto"
    """Element type of a .bin token file: uint16, uint32, or auto (uint16 when vocab ≤ 65536)."""
    init_from: str = ""
    """A Hugging Face Llama directory (config.json + safetensors) to start from: its config replaces
    --model and each rank reads only the tensors it holds (docs/hf.md)."""
    tokenizer: str = ""
    """A Hugging Face tokenizer directory: --data text/JSONL is tokenized once, cached next to it, EOS
    after every document."""
    text_field: str = "text"
    """The JSON field holding a document's text in a .jsonl --data file."""
    pack_documents: bool = False
    """Packed documents: each token attends only within its document (document-causal attention through
    the slices, fully masked K/V blocks skipped), positions restart per document (--doc-positions) and no
    loss is taken across a boundary. Boundaries: tokenized text's documents, the stdlib corpus' files, or
    --eod-id in a token file (docs/runtime.md "Packed documents")."""
    doc_positions: str = "document"
    """With --pack-documents: RoPE positions count from each document's start (document) or along the row
    (global; the same attention for RoPE, which only sees relative positions inside a document)."""
    eod_id: int = -1
    """Token id that ends a document in a .bin/.npy file (it belongs to the document it ends); -1: none."""
    seq_len: int = 2048
    """s: tokens per sequence (each sample reads s + 1 tokens: inputs and shifted labels)."""
    global_batch: int = 4
    """B: sequences per optimizer step over all data-parallel replicas (m = B / dp per pipeline)."""
    # --- parallel layout and schedule -----------------------------------------------------------
    pp: int = 2
    """p: pipeline stages (ranks per pipeline)."""
    dp: int = 1
    """d: data-parallel replicas; the world is tp·cp·pp·dp processes."""
    tp: int = 1
    """t: tensor-parallel size (Megatron TP with sequence parallelism); must divide the model's heads,
    K/V heads, FFN size and vocabulary, and every slice's tokens."""
    cp: int = 1
    """c: context-parallel size: every slice is cut into 2c zig-zag pieces, CP rank r holds pieces r and
    2c−1−r (query-out attention over the CP group); seq_len must be a multiple of 2·c·t·slices."""
    ep: int = 1
    """e: expert-parallel size (MoE models): each MoE layer's experts are split over groups of e
    data-parallel ranks, tokens reach them by all-to-all per slice; must divide dp and num_experts."""
    vpp: int = 1
    """v: virtual stages per pipeline rank (interleaving)."""
    slices: int = 4
    """n: slices per sequence; seq_len must be a multiple of it."""
    schedule: str = "slimpipe"
    """Schedule builder: gpipe, 1f1b, interleaved-1f1b, seq1f1b or slimpipe."""
    warmup: str = "auto"
    """Schedule warm-up: single (synchronous p2p), double (overlapped p2p) or auto."""
    slice_split: str = "auto"
    """How a sequence is cut into slices: equal (token counts), equal-flop (equal prefix-aware FLOPs: long
    early slices, short late ones) or auto (equal-flop for seq1f1b, equal otherwise)."""
    attn_balance: int = 0
    """Attention context exchange: most K/V-prefix slices one rank hands to a concurrent partner per
    exchange (0 = off; slimpipe schedule, equal slices; docs/exchange.md)."""
    vocab_parallel: bool = False
    """Shard the embedding and output layer over all pipeline ranks (VE/VH/VB collectives per slice,
    docs/vocab_parallel.md): saves the end stages' vocabulary memory; pays off when V·h is large
    against a stage's layers."""
    recompute: str = "none"
    """Activation recompute per slice: none, partial (SwiGLU), partial+fc1 (output projection, norm-2,
    fc1, SwiGLU) or full (the whole block; K/V stay in the store): the simulator's modes (docs/runtime.md)."""
    offload: float = 0.0
    """α: fraction of each unit's saved activations moved to host memory after its forward and prefetched
    back before its backward, in [0, 1) (docs/runtime.md "Activation offload")."""
    offload_min_bytes: int = 1 << 20
    """Saved tensors smaller than this are never offloaded (the official threshold, 1 MiB)."""
    # --- optimisation ---------------------------------------------------------------------------
    steps: int = 12
    """Optimizer steps in the whole run (a resumed run continues up to this number)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    lr_warmup: int = 3
    """Linear learning-rate warm-up steps; then cosine decay to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seeds initial weights and data order; nothing else does (same curve for every layout)."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32, bfloat16 or float64."""
    # --- processes --------------------------------------------------------------------------------
    nproc: int = 0
    """Local processes to start (0: tp·cp·pp·dp, or 1 with local_pipeline). Ignored under torchrun."""
    local_pipeline: bool = False
    """Run every pipeline stage in one process (dp must be 1)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available). CPU uses gloo, CUDA uses NCCL."""
    threads: int = 0
    """torch threads per process (0: CPU cores // local processes, at least 1)."""
    timeout: float = 120.0
    """Seconds a rank waits for a peer before the run fails naming the dead rank."""
    # --- outputs --------------------------------------------------------------------------------
    out_dir: str = ""
    """Run directory for config.json, metrics.jsonl, checkpoints (default runs/train-<date>-<time>)."""
    log_json: str = ""
    """Per-step JSON lines (default <out_dir>/metrics.jsonl)."""
    log_every: int = 1
    """Print the step line every this many steps (the JSON log gets every step)."""
    progress: bool = True
    """Draw a progress bar on stderr when it is a terminal."""
    trace: str = ""
    """Write the last step's executed timeline as a Chrome/Perfetto trace JSON to this path."""
    checkpoint_dir: str = ""
    """Where checkpoints go (default <out_dir>/checkpoints); must be shared by all nodes."""
    checkpoint_every: int = 0
    """Save every this many steps and at the last step (0: never)."""
    keep_checkpoints: int = 2
    """Checkpoints to keep (older ones are deleted after a successful save; 0 keeps all)."""
    resume: str = ""
    """Resume from a checkpoint: 'latest' (in checkpoint_dir), a checkpoint root or a step directory."""
    overwrite: bool = False
    """Allow replacing the outputs of an earlier run in out_dir."""
    peak_tflops: float = 0.0
    """Per-process peak TFLOP/s for MFU (0: datasheet for known GPUs, else a measured matmul)."""
    nonfinite: str = "stop"
    """A step whose loss or grad norm is nan/inf is never applied; then stop (exit 3, naming the last
    checkpoint with a finite loss) or skip (continue; stop after 5 such steps in a row)."""

    def __post_init__(self) -> None:
        for f in ("seq_len", "global_batch", "pp", "dp", "tp", "cp", "ep", "vpp", "slices", "steps", "log_every"):
            val = getattr(self, f)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ConfigError(f"--{_flag(f)}={val!r} must be a positive integer")
        for f in ("nproc", "threads", "lr_warmup", "checkpoint_every", "keep_checkpoints", "seed",
                  "attn_balance", "offload_min_bytes"):
            val = getattr(self, f)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ConfigError(f"--{_flag(f)}={val!r} must be a non-negative integer")
        for f, allowed in (("dtype", DTYPES), ("device", DEVICES), ("data_dtype", DATA_DTYPES),
                           ("recompute", RECOMPUTE_MODES)):
            if getattr(self, f) not in allowed:
                raise ConfigError(f"--{_flag(f)}={getattr(self, f)!r} is unknown: use one of {', '.join(allowed)}")
        if self.doc_positions not in DOC_POSITIONS:
            raise ConfigError(f"--doc-positions={self.doc_positions!r} is unknown: use one of "
                              f"{', '.join(DOC_POSITIONS)}")
        if self.pack_documents and self.cp > 1:
            raise ConfigError("--pack-documents runs without context parallelism (the zig-zag pieces would "
                              "need document-aware CP attention): use --cp 1")
        if self.pack_documents and self.attn_balance:
            raise ConfigError("--pack-documents runs without the attention exchange (document masking "
                              "already evens out the slices): use --attn-balance 0")
        if not isinstance(self.eod_id, int) or self.eod_id < -1:
            raise ConfigError(f"--eod-id={self.eod_id!r} must be a token id ≥ 0, or -1 for none")
        if self.nonfinite not in NONFINITE:
            raise ConfigError(f"--nonfinite={self.nonfinite!r} is unknown: use one of {', '.join(NONFINITE)}")
        if not 0 < self.lr < math.inf:  # also false for nan
            raise ConfigError(f"--lr={self.lr!r} must be a positive finite number")
        for f in ("weight_decay", "clip", "peak_tflops"):
            if not 0 <= getattr(self, f) < math.inf:
                raise ConfigError(f"--{_flag(f)}={getattr(self, f)!r} must be a finite number ≥ 0"
                                  + (" (0 disables clipping)" if f == "clip" else ""))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not 5 <= self.timeout < math.inf:
            raise ConfigError(f"--timeout={self.timeout!r} must be a finite number of seconds ≥ 5")
        if not 0.0 <= self.offload < 1.0:
            raise ConfigError(f"--offload={self.offload!r} must be in [0, 1): it is the offloaded fraction α")
        if self.local_pipeline and self.dp != 1:
            raise ConfigError(f"--local-pipeline runs one pipeline (got dp={self.dp}): use --dp 1")
        if self.local_pipeline and self.tp * self.cp != 1:
            raise ConfigError(f"--local-pipeline runs one process (got tp={self.tp}, cp={self.cp}): use "
                              "--tp 1 --cp 1 or drop "
                              "--local-pipeline")

    @property
    def world(self) -> int:
        """Processes the layout needs: tp·cp·pp·dp (1 with local_pipeline)."""
        return 1 if self.local_pipeline else self.tp * self.cp * self.pp * self.dp

    @property
    def microbatches(self) -> int:
        """m: sequences per pipeline per step."""
        return self.global_batch // self.dp

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def resolved(self) -> TrainConfig:
        """Fill the derived paths: out_dir (timestamped), log_json and checkpoint_dir inside it."""
        out = self.out_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}"
        return self.replace(
            out_dir=out,
            log_json=self.log_json or str(Path(out) / "metrics.jsonl"),
            checkpoint_dir=self.checkpoint_dir or str(Path(out) / "checkpoints"),
        )


def _flag(field: str) -> str:
    return field.replace("_", "-")


def field_docs() -> dict[str, str]:
    """Field name -> its docstring (one source of truth for the dataclass and the --help text)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())  # type: ignore[union-attr]
    return docs


def load_config_file(path: str) -> dict[str, object]:
    """Keys of a TOML/JSON file (or of a run's resolved config.json under "train"), checked by name."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such file"
        raise ConfigError(f"--config {path}: {what}; give a .toml or .json file of TrainConfig keys")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"--config {path}: TOML needs Python ≥ 3.11; give the same keys as JSON") from None
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"--config {path}: cannot parse ({exc}); fix the file or use JSON") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]  # the config.json a run writes
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table/object of TrainConfig keys")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; valid keys are the flags: {sorted(known)}")
    return data
