"""Hugging Face checkpoints: per-rank load time and peak host memory, and eval loss next to transformers'.

    flock /work/measure.lock python bench/hf_bench.py load  [--dir /tmp/slimpipe-hf-bench] [--ranks 1 2 4]
    flock /work/measure.lock python bench/hf_bench.py eval

``load``: writes (once) a random Llama-3.2-1B-shaped checkpoint (L16 h2048 f8192 32/8 heads, V 128256,
untied: 1.50 B parameters, bf16 safetensors in 1 GiB files, 3.0 GB), then for each p forks p gloo ranks
that build a vocab-parallel bf16 PipelineRuntime and load it with ``load_hf_weights``; each rank reports
load seconds, bytes read, its own parameter bytes, its RSS before the load and its peak RSS during it
(VmHWM, reset through /proc/self/clear_refs just before).
The control is ``safetensors.torch.load_file`` of every file, materialised (cloned: load_file's tensors may
be lazy views of the mapping), in one process: what a loader that does not slice holds. ``eval``: a random L4 h256 Llama with a BPE tokenizer trained on stdlib text,
`slimpipe eval` in two layouts against transformers' loss on the same windows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

L1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
           tie_word_embeddings=False, rms_norm_eps=1e-5, model_type="llama", architectures=["LlamaForCausalLM"],
           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(root: Path) -> None:
    """Random bf16 weights, one tensor at a time, into ≤ 1 GiB safetensors files with an index."""
    from safetensors.torch import save_file

    from slimpipe.hf.config import expected_shapes, hf_name, model_from_hf

    if (root / "config.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    model = model_from_hf(L1B, root)
    gen = torch.Generator().manual_seed(0)
    shards, cur, size, weight_map = [], {}, 0, {}
    for name, shape in expected_shapes(model).items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if cur and size + t.numel() * 2 > 1 << 30:
            shards.append(cur)
            cur, size = {}, 0
        cur[hf_name(name)] = t
        size += t.numel() * 2
    shards.append(cur)
    for k, sd in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in sd})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(L1B))


def _rank_load(rank: int, world: int, path: str) -> dict[str, float]:
    from slimpipe.hf.config import open_checkpoint
    from slimpipe.hf.weights import load_hf_weights
    from slimpipe.runtime import ParallelState, PipelineRuntime
    from slimpipe.schedule.builders import build

    ckpt = open_checkpoint(path)
    state = ParallelState.create(pp=world, timeout_s=600)
    rt = PipelineRuntime(ckpt.model, build("gpipe", p=world, m=1, n=1), state, dtype=torch.bfloat16,
                         vocab_parallel=world > 1)
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS: the peak of the load alone
    before = _status("VmRSS")
    t0 = time.perf_counter()
    st = load_hf_weights(rt, ckpt)
    secs = time.perf_counter() - t0
    own = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    return {"rank": rank, "seconds": secs, "read_gb": st.bytes_read / 1e9, "own_gb": own / 1e9,
            "rss_before_gb": before / 1e9, "hwm_after_gb": _status("VmHWM") / 1e9, "ckpt_gb": ckpt.num_bytes / 1e9}


def _naive(path: str) -> dict[str, float]:
    """The control in a fresh process: the whole checkpoint in memory (safetensors.torch.load_file)."""
    code = (
        "import json, time, glob, sys; from safetensors.torch import load_file; t0 = time.perf_counter(); "
        f"sd = {{}}; [sd.update({{k: v.clone() for k, v in load_file(f).items()}}) for f in sorted(glob.glob('{path}/*.safetensors'))]; "
        "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'hwm_gb': hwm / 1e9}))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def bench_load(root: Path, ranks: list[int]) -> None:
    from slimpipe.runtime.forked import run_forked

    t0 = time.perf_counter()
    write_checkpoint(root)
    print(f"# checkpoint {root} ready in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.2f}")
    print("p  rank  load_s  read_GB  own_GB  RSS_before_load_GB  peak_RSS_in_load_GB  ckpt_GB")
    for p in ranks:
        for r in run_forked(_rank_load, p, str(root), timeout_s=900):
            print(f"{p}  {r['rank']:4d}  {r['seconds']:6.2f}  {r['read_gb']:7.3f}  {r['own_gb']:6.3f}  "
                  f"{r['rss_before_gb']:18.3f}  {r['hwm_after_gb']:19.3f}  {r['ckpt_gb']:7.3f}")
    n = _naive(str(root))
    print(f"control: load_file + clone of every file: {n['seconds']:.2f} s, peak RSS {n['hwm_gb']:.3f} GB")


def _tokenizer_and_docs(root: Path) -> tuple[Path, Path, int]:
    """A 2000-token byte-level BPE trained on stdlib text, and those texts as JSONL documents."""
    import pydoc_data.topics as topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = [t for _, t in sorted(topics.topics.items())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<eos>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with open(root / "docs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return root / "tok", root / "docs.jsonl", tok.get_vocab_size()


def _hf_loss_sum(model, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))


def bench_eval() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import numpy as np

    from slimpipe.train.corpus import tokenize_corpus

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok, data, vocab = _tokenizer_and_docs(root)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     rope_theta=500000.0)).save_pretrained(root / "m")
        seq, windows = 256, 32
        base = [sys.executable, "-m", "slimpipe", "eval", "--init-from", str(root / "m"), "--data", str(data),
                "--tokenizer", str(tok), "--seq-len", str(seq), "--max-windows", str(windows), "--json"]
        rows = []
        for extra in (["--pp", "1", "--local-pipeline"], ["--pp", "2", "--slices", "4", "--vocab-parallel"]):
            out = subprocess.run(base + extra, capture_output=True, text=True, check=True).stdout
            rows.append((" ".join(extra), json.loads(out.strip().splitlines()[-1])))
        tokens, _ = tokenize_corpus(data, str(tok), "text", vocab)
        batch = torch.from_numpy(np.stack([tokens[k * seq : k * seq + seq + 1] for k in range(windows)]).astype(np.int64))
        model = LlamaForCausalLM.from_pretrained(root / "m").eval()
        with torch.no_grad():
            want = sum(_hf_loss_sum(model, batch[i : i + 4]) for i in range(0, windows, 4)) / (windows * seq)
        print(f"# {windows} windows × {seq} tokens, fp32; load average {os.getloadavg()[0]:.2f}")
        print(f"transformers                       loss {want:.7f}  perplexity {np.exp(want):.4f}")
        for name, r in rows:
            print(f"slimpipe eval {name:<36} loss {r['loss']:.7f}  perplexity {r['perplexity']:.4f}  "
                  f"rel. diff {abs(r['loss'] - want) / want:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("load", "eval"))
    ap.add_argument("--dir", default="/tmp/slimpipe-hf-bench")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    if args.what == "load":
        bench_load(Path(args.dir), args.ranks)
    else:
        bench_eval()


if __name__ == "__main__":
    main()
