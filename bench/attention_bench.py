"""Sliced attention (n slices, K/V prefix, reverse-order backward) vs one unsliced causal attention.

Both compute forward + backward of causal attention over the same s tokens; the sliced one goes through
the runtime's K/V store exactly as a pipeline stage does (slice j attends to the zero-copy window of slices
0..j, the backward hands dK/dV down). Prints time per fwd+bwd and the ratio to unsliced, plus the largest
output difference as a sanity check. Examples::

    python bench/attention_bench.py                                   # CPU, s=4096, fp32
    python bench/attention_bench.py --device cuda --seq 65536 --dtype bfloat16 --heads 32 --kv-heads 8 \\
        --head-dim 128 --slices 1 4 8 16 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.kv import KVStore
from slimpipe.runtime.stage import slice_bounds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unsliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """q (b, s, H, d), k/v (b, s, H_kv, d): one causal SDPA forward + backward."""
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    out = scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2)).transpose(1, 2)
    out.backward(dout)
    return out.detach()


def sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, n: int,
           masks: MaskCache) -> torch.Tensor:
    """The same through the K/V store: forwards 0..n−1, backwards n−1..0."""
    bounds = slice_bounds(q.size(1), [1.0 / n] * n)
    store = KVStore(bounds, masks)
    outs, ins = [], []
    for j in range(n):
        a, b = bounds[j], bounds[j + 1]
        qj, kj, vj = (x[:, a:b].detach().requires_grad_() for x in (q, k, v))
        outs.append(store.begin_forward(0, 0, j).layer(0).attend(qj, kj, vj))
        ins.append((qj, kj, vj))
    for j in reversed(range(n)):
        store.begin_backward(0, 0, j)
        outs[j].backward(dout[:, bounds[j]:bounds[j + 1]])
        store.end_backward(0, 0, j)
    store.check_drained()
    return torch.cat([o.detach() for o in outs], 1)


def _time(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up (kernel selection, mask table)
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--slices", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mask-mode", default="auto",
                    help="auto | table | bias (see slimpipe.runtime.attention)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    shape_q = (1, args.seq, args.heads, args.head_dim)
    shape_kv = (1, args.seq, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
    dout = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
    masks = MaskCache(args.mask_mode)
    ref = unsliced(q, k, v, dout)
    base = _time(lambda: unsliced(q, k, v, dout), device, args.repeat)
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {threads}, s={args.seq}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, {args.dtype}, mask {args.mask_mode}; median of {args.repeat}\n")
    print("| slices n | fwd+bwd ms | ÷ unsliced | max |out − unsliced| |")
    print("|---|---|---|---|")
    print(f"| unsliced | {base * 1e3:.1f} | 1.00 | 0 |")
    for n in args.slices:
        out = sliced(q, k, v, dout, n, masks)
        diff = float((out.float() - ref.float()).abs().max())
        t = _time(lambda: sliced(q, k, v, dout, n, masks), device, args.repeat)
        print(f"| {n} | {t * 1e3:.1f} | {t / base:.2f} | {diff:.2e} |")
    if device.type == "cuda":
        print(f"\npeak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
