"""Running short real trainings from tests: forked ranks on gloo, one thread each, metrics read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimpipe.train import TrainConfig, train

# The tiny preset (8 layers, h=128, byte vocab) on the synthetic permutation walk: 64 tokens per sequence
# split into up to 8 slices, 4 sequences per step, enough for every layout of the tests.
TINY = dict(model="tiny", data="synthetic", seq_len=64, global_batch=4, lr=3e-3, lr_warmup=1, threads=1,
            timeout=30.0, progress=False)


def run_training(out: Path, **overrides: Any) -> list[dict[str, Any]]:
    """Train with TINY + overrides into ``out``; assert success; return the JSON-lines records."""
    cfg = TrainConfig(**{**TINY, "out_dir": str(out), **overrides})
    code = train(cfg)
    assert code == 0, f"training failed with exit code {code}"
    return read_log(out / "metrics.jsonl")


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records]
