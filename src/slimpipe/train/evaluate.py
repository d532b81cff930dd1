"""`slimpipe eval` on one rank: mean next-token loss and perplexity over a file's non-overlapping windows.

Window k is ``tokens[k·S : k·S + S + 1]`` (inputs its first S tokens, labels its last S), k = 0 …
⌊(N − 1)/S⌋ − 1. Windows go through the runtime's forward-only step (``evaluate``) ``batch`` at a time, in
the run's pipeline layout with its slices; the per-window loss sums are added in float64 and divided by
the number of labelled tokens once at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import torch

from slimpipe.train.preflight import Prepared

__all__ = ["evaluate_loop", "summary_line"]


def evaluate_loop(prep: Prepared, rt: Any, *, rank: int, device: torch.device) -> dict[str, Any]:
    """Evaluate every window; every rank returns the same result dict (rank 0 prints it)."""
    cfg, opts = prep.cfg, prep.evaluation
    assert opts is not None
    s = cfg.seq_len
    total = prep.data.eval_windows(s)
    if opts.max_windows:
        total = min(total, opts.max_windows)
    t0 = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    for first in range(0, total, opts.batch):
        rows = min(opts.batch, total - first)
        batch = torch.from_numpy(prep.data.windows(first, rows, s)).to(device)  # (rows, S+1)
        docs = None
        if cfg.pack_documents:  # no loss where the next token opens another document
            ids = prep.data.window_documents(first, rows, s)
            docs = torch.from_numpy(ids)
            tokens += int((ids[:, 1:] == ids[:, :-1]).sum())
        else:
            tokens += rows * s
        loss_sum += rt.evaluate(batch, loss_tokens=1, documents=docs).loss  # loss_tokens=1: the plain sum
    seconds = time.perf_counter() - t0
    loss = loss_sum / tokens
    out = {
        "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens,
        "windows": total, "seq_len": s, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
        "model": prep.model.name, "data": prep.data.name,
        "layout": {"tp": cfg.tp, "pp": cfg.pp, "vpp": cfg.vpp, "slices": cfg.slices, "vocab_parallel": cfg.vocab_parallel,
                   "local_pipeline": cfg.local_pipeline, "dtype": cfg.dtype,
                   "pack_documents": cfg.pack_documents},
    }
    if rank == 0:
        sys.stdout.write((json.dumps(out) if opts.json else summary_line(out)) + "\n")
        sys.stdout.flush()
    return out


def summary_line(res: dict[str, Any]) -> str:
    lay = res["layout"]
    return (f"slimpipe eval: {res['model']} on {res['data']}: {res['windows']} windows × {res['seq_len']} = "
            f"{res['tokens']:,} tokens (pp={lay['pp']} vpp={lay['vpp']} slices={lay['slices']} {lay['dtype']})\n"
            f"loss {res['loss']:.6f}  perplexity {res['perplexity']:.4f}  {res['tokens_per_s']:,.0f} tokens/s "
            f"in {res['seconds']:.2f} s")
