"""`slimpipe eval`: mean next-token loss and perplexity of a checkpoint over a token or text file.

Weights from ``--init-from`` (a Hugging Face Llama directory) or ``--resume`` (a `slimpipe train`
checkpoint); windows of ``--seq-len`` tokens run forward-only through the pipeline layout given by the
layout flags (slices included). Same launch paths as `slimpipe train` (``--nproc``, torchrun,
``--local-pipeline``).
"""

from __future__ import annotations

import argparse

from slimpipe.train.config import DATA_DTYPES, DEVICES, DOC_POSITIONS, DTYPES

__all__ = ["HELP", "add_arguments", "run"]

HELP = "evaluate loss/perplexity of a Hugging Face or slimpipe checkpoint on a data file, in any layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--init-from", metavar="DIR", help="Hugging Face Llama directory (config.json + safetensors)")
    src.add_argument("--resume", metavar="CKPT", help="a `slimpipe train` checkpoint root or step directory")
    parser.add_argument("--data", required=True, help=".bin/.npy tokens, or text/JSONL with --tokenizer")
    parser.add_argument("--data-dtype", default="auto", choices=DATA_DTYPES, help="element type of a .bin file")
    parser.add_argument("--tokenizer", default="", metavar="DIR", help="Hugging Face tokenizer directory for text data")
    parser.add_argument("--text-field", default="text", help="JSON field of a document in .jsonl data [text]")
    parser.add_argument("--pack-documents", action="store_true",
                        help="document-causal attention, positions per document, no loss across a boundary")
    parser.add_argument("--doc-positions", default="document", choices=DOC_POSITIONS,
                        help="with --pack-documents: RoPE positions per document or along the window [document]")
    parser.add_argument("--eod-id", type=int, default=-1, help="token id ending a document in a .bin/.npy file")
    parser.add_argument("--seq-len", type=int, required=True, help="S: tokens per window (labels are the next S)")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward-only step [4]")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0: all)")
    parser.add_argument("--tp", type=int, default=1, help="t: tensor-parallel ranks per stage [1]")
    parser.add_argument("--pp", type=int, default=1, help="p: pipeline stages [1]")
    parser.add_argument("--vpp", type=int, default=1, help="v: virtual stages per rank [1]")
    parser.add_argument("--slices", type=int, default=1, help="n: slices per window [1]")
    parser.add_argument("--vocab-parallel", action="store_true", help="shard embedding/output over the pipeline")
    parser.add_argument("--local-pipeline", action="store_true", help="every stage in this process")
    parser.add_argument("--nproc", type=int, default=0, help="local processes (0: tp·pp)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores/processes)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a peer rank")
    parser.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, tokens, …)")


def run(args: argparse.Namespace) -> int:
    from slimpipe.train.config import TrainConfig
    from slimpipe.train.eval_options import EvalOptions
    from slimpipe.train.launch import launch
    from slimpipe.train.preflight import preflight, torchrun_env

    opts = EvalOptions(batch=args.batch, max_windows=args.max_windows, json=args.json)
    # gpipe with m = batch: always feasible; evaluate() runs its forward half whatever the row count.
    cfg = TrainConfig(
        init_from=args.init_from or "", resume=args.resume or "", data=args.data, data_dtype=args.data_dtype,
        tokenizer=args.tokenizer, text_field=args.text_field, pack_documents=args.pack_documents,
        doc_positions=args.doc_positions, eod_id=args.eod_id, seq_len=args.seq_len, global_batch=args.batch,
        tp=args.tp, pp=args.pp, vpp=args.vpp, slices=args.slices, schedule="gpipe", vocab_parallel=args.vocab_parallel,
        local_pipeline=args.local_pipeline, nproc=args.nproc, device=args.device, dtype=args.dtype,
        threads=args.threads, timeout=args.timeout, progress=False,
    )
    env = torchrun_env()
    return launch(preflight(cfg, env=env, check_outputs=False, evaluation=opts), env=env)
