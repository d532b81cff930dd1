"""Packed documents: attention work saved by document masking in sliced runs, measured and simulated.

Realistic document mix: the stdlib corpus (`--data stdlib`, byte tokens), one document per .py file — real
code files, 734 of them, mean 16.5 K tokens, heavy-tailed (median ≈ 9 K). Rows are windows at random offsets
of the packed corpus (the trainer's sampler); the simulator's `--doc-lengths stdlib` draws documents i.i.d.
from the same files' lengths.

``kernels``: one slice's attention forward + backward on CPU, three ways, on slices cut from real rows:
``segments`` (runtime/documents.py: per-document calls, the carry-in document's rectangle over the prefix
blocks), ``mask`` (one SDPA call over the whole K/V window with the dense document-causal boolean mask: the
other option for CPU) and ``causal`` (no document masking: the runtime's causal slice attention over the
per-slice K/V blocks, runtime/slice_attention.py). Also the same
with fixed-length documents (1024, 256 and 32 tokens): many segments per slice.

``pairs``: the attention work per slice (document-causal pairs ÷ causal pairs) over 512 windows of the
packed corpus as the trainer samples them — exactly what the runtime's kernels compute (their spans) — next
to the simulator's expectation for `--doc-lengths stdlib` at the same s and n (no timing: exact counts).

``run``: a sliced pipeline (p = 2, n slices, local runtime, fp32) forward + backward on packed stdlib rows
with and without document masking, side by side in alternating rounds (least of the rounds).

    flock /work/measure.lock python bench/doc_bench.py kernels
    python bench/doc_bench.py pairs
    flock /work/measure.lock python bench/doc_bench.py run --seq 16384 --slices 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from slimpipe.config import ModelConfig
from slimpipe.runtime import LocalPipelineRuntime
from slimpipe.runtime.documents import RowDocs, document_attention
from slimpipe.runtime.slice_attention import Window, slice_attention
from slimpipe.schedule.builders import build
from slimpipe.sim.documents import causal_slice_pairs, expected_slice_pairs, parse_doc_lengths, slice_spans
from slimpipe.train.data import load_data


def _rows(seq: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    data = load_data("stdlib", vocab_size=256, seq_len=seq, need_documents=True)
    toks = np.concatenate([data.batch(k, seed=seed, batch=1, seq_len=seq) for k in range(1, count + 1)])
    docs = np.concatenate([data.batch_documents(k, seed=seed, batch=1, seq_len=seq) for k in range(1, count + 1)])
    return toks, docs


def _time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slice_attention(way: str, q, k, v, start: int, row: RowDocs, doc: torch.Tensor):
    end = k.size(1)
    if way in ("segments", "causal"):  # the runtime's paths: the prefix as the K/V store's earlier blocks
        t = end - start
        window = Window(prefix_k=[k[:, i:i + t].detach() for i in range(0, start, t)],
                        prefix_v=[v[:, i:i + t].detach() for i in range(0, start, t)], handed=lambda: (None, None),
                        deposit=lambda *_: None)
        if way == "causal":
            return slice_attention(q, k[:, start:], v[:, start:], window)
        return document_attention(q, k[:, start:], v[:, start:], window, row.spans(start, end))
    qpos = torch.arange(start, end)[:, None]
    mask = (doc[start:end, None] == doc[None, :end]) & (torch.arange(end)[None, :] <= qpos)  # (t, end)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def kernels(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    s, n, h, hk, d = args.seq, args.slices, 4, 2, 64
    t = s // n
    _, docs = _rows(s, 2)
    out = []
    mixes = [("stdlib", docs)] + [(f"{L}-token docs", (np.arange(s + 1) // L)[None, :]) for L in (1024, 256, 32)]
    for label, rows in mixes:
        for r, row_ids in enumerate(rows):
            doc = torch.from_numpy(row_ids[:s])
            row = RowDocs.of(doc)
            for j in (1, n - 1):  # an early and the last slice
                start, end = j * t, (j + 1) * t
                q = torch.randn(1, t, h, d, requires_grad=True)
                k = torch.randn(1, end, hk, d, requires_grad=True)
                v = torch.randn(1, end, hk, d, requires_grad=True)
                sp = slice_spans(row.starts, start, end)
                res = {"mix": label, "row": r, "slice": j, "documents_in_slice": len(sp.segments),
                       "pairs_ratio": sum(sp.pairs()) / sum(causal_slice_pairs([0, start, end])[1])}
                for way in ("segments", "mask", "causal"):
                    def step(way=way):
                        o = _slice_attention(way, q, k, v, start, row, doc)
                        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
                    res[way + "_ms"] = 1e3 * _time(step, args.repeat)
                out.append(res)
                print(json.dumps(res), flush=True)
            if label != "stdlib":
                break
    return out


def _corpus_pairs(seq: int, n: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(measured, simulated, causal) attention pairs per slice: measured over ``rows`` windows of the packed
    stdlib corpus as the trainer samples them (the spans the runtime's kernels run, exact), simulated from
    `--doc-lengths stdlib` (documents drawn i.i.d. from the files' lengths)."""
    data = load_data("stdlib", vocab_size=256, seq_len=seq, need_documents=True)
    bounds = [j * seq // n for j in range(n + 1)]
    measured = np.zeros(n)
    for k in range(1, rows + 1):
        starts = RowDocs.of(torch.from_numpy(data.batch_documents(k, seed=0, batch=1, seq_len=seq)[0, :seq])).starts
        measured += [sum(slice_spans(starts, a, b).pairs()) for a, b in zip(bounds, bounds[1:])]
    causal = np.array([sum(x) for x in causal_slice_pairs(bounds)])
    simulated = np.array([sum(x) for x in expected_slice_pairs(parse_doc_lengths("stdlib"), bounds)])
    return measured / rows, simulated, causal


def pairs(args: argparse.Namespace) -> list[dict]:
    """Attention work per slice, document-causal ÷ causal: corpus windows (measured) vs the simulator."""
    out = []
    for seq in args.seqs:
        measured, simulated, causal = _corpus_pairs(seq, args.slices, args.rows)
        res = {"seq": seq, "slices": args.slices, "rows": args.rows,
               "measured": float(measured.sum() / causal.sum()), "simulated": float(simulated.sum() / causal.sum()),
               "per_slice_measured": (measured / causal).round(3).tolist(),
               "per_slice_simulated": (simulated / causal).round(3).tolist()}
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    s, n = args.seq, args.slices
    cfg = ModelConfig(name="bytes-doc", num_layers=2, hidden=128, ffn=256, num_heads=4, num_kv_heads=2,
                      head_dim=32, vocab_size=256)
    toks, docs = _rows(s, args.rows)
    tok_t, doc_t = torch.from_numpy(toks), torch.from_numpy(docs)
    sched = build("slimpipe", p=2, m=args.rows, n=n)
    rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float32, seed=0)
    times = {"documents": [], "causal": []}
    for _ in range(args.repeat):  # alternating rounds: load drifts hit both alike
        for label, kw in (("documents", {"documents": doc_t}), ("causal", {})):
            rt.zero_grad()
            t0 = time.perf_counter()
            rt.forward_backward(tok_t, **kw)
            times[label].append(time.perf_counter() - t0)
    bounds = [j * s // n for j in range(n + 1)]
    trained = np.zeros(n)
    for row_ids in docs:  # the rows this run trained on
        row = RowDocs.of(torch.from_numpy(row_ids[:s]))
        trained += [sum(slice_spans(row.starts, a, b).pairs()) for a, b in zip(bounds, bounds[1:])]
    trained /= len(docs)
    causal = np.array([sum(x) for x in causal_slice_pairs(bounds)])
    res = {
        "seq": s, "slices": n, "rows": args.rows, "load_avg": os.getloadavg()[0],
        "step_s": {k: min(v) for k, v in times.items()},
        "step_ratio": min(times["documents"]) / min(times["causal"]),
        "attention_ratio_these_rows": float(trained.sum() / causal.sum()),
        "per_slice_these_rows": (trained / causal).round(3).tolist(),
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--seq", type=int, default=8192)
    k.add_argument("--slices", type=int, default=4)
    k.add_argument("--repeat", type=int, default=3)
    q = sub.add_parser("pairs")
    q.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 131072])
    q.add_argument("--slices", type=int, default=8)
    q.add_argument("--rows", type=int, default=512)
    r = sub.add_parser("run")
    r.add_argument("--seq", type=int, default=16384)
    r.add_argument("--slices", type=int, default=8)
    r.add_argument("--rows", type=int, default=2)
    r.add_argument("--repeat", type=int, default=2)
    for p in (k, q, r):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"kernels": kernels, "pairs": pairs, "run": run}[args.what](args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
