"""Sliced attention (n slices, K/V prefix, reverse-order backward) vs one unsliced causal attention.

Both compute forward + backward of causal attention over the same s tokens; the sliced one goes through
the runtime's K/V store exactly as a pipeline stage does (slice j attends to the blocks of slices 0..j in
place, the backward hands dK/dV down block by block). Prints time per fwd+bwd and the ratio to unsliced, plus the largest
output difference as a sanity check. Unsliced and every ``--mask-mode`` are timed round-robin per n.
Examples::

    python bench/attention_bench.py                                   # CPU, s=4096, fp32
    OMP_NUM_THREADS=1 python bench/attention_bench.py --clock process --mask-mode auto table
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

from slimpipe.runtime.attention import MaskCache, window_attention
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


def windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, n: int) -> torch.Tensor:
    """The former store (``window``): one whole-sequence K/V buffer per micro-batch, slice j attends to the
    contiguous view of rows [0, end_j) with the two-block kernel (WindowBlocks), autograd sums the window
    gradients into the buffer."""
    bounds = slice_bounds(q.size(1), [1.0 / n] * n)
    ks, vs = k.detach().requires_grad_(), v.detach().requires_grad_()
    masks = MaskCache("auto")
    outs = []
    for j in range(n):
        a, b = bounds[j], bounds[j + 1]
        qj = q[:, a:b].detach().requires_grad_()
        outs.append(window_attention(qj, ks[:, :b], vs[:, :b], a, masks, q.size(1)))
    torch.autograd.backward(outs[::-1], [dout[:, bounds[j]:bounds[j + 1]] for j in reversed(range(n))])
    return torch.cat([o.detach() for o in outs], 1)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _time(fn, device: torch.device, repeat: int, clock: str = "wall") -> float:
    """Median seconds of fn(). ``process`` (CPU time of this process) resists other load on a shared
    machine when torch runs one thread; it is meaningless on CUDA."""
    return _time_many({"": fn}, device, repeat, clock)[""]


def _time_many(fns: dict, device: torch.device, repeat: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds of each fn(), timed round-robin (so load changes hit every variant alike)."""
    now = CLOCKS[clock]
    for fn in fns.values():
        fn()  # warm-up (kernel selection, mask table)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = now()
            fn()
            _sync(device)
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, repeat: int) -> None:
    """Which fused kernels accept the last slice's lower-right call, and what each way of making it costs."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    s, t = q.size(1), q.size(1) // n
    qt = q[:, s - t:].transpose(1, 2).detach().requires_grad_()
    kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (k, v))
    gqa = qt.size(1) != kt.size(1)
    params = SDPAParams(qt, kt, vt, None, 0.0, False, gqa)
    print(f"last slice q {tuple(qt.shape)}, k {tuple(kt.shape)}, enable_gqa={gqa}: "
          f"flash {can_use_flash_attention(params, True)}, efficient {can_use_efficient_attention(params, True)}")
    rep = qt.size(1) // kt.size(1)
    ways = {
        "causal_lower_right": lambda: scaled_dot_product_attention(
            qt, kt, vt, attn_mask=causal_lower_right(t, s), enable_gqa=gqa),
        "causal_lower_right, heads expanded": lambda: scaled_dot_product_attention(
            qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1), attn_mask=causal_lower_right(t, s)),
        "no mask (flash, reference cost)": lambda: scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa),
    }
    for name, fn in ways.items():
        def step(fn=fn):
            fn().backward(torch.ones_like(qt))
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                              SDPBackend.MATH]):
                print(f"  {name}: {_time(step, q.device, repeat) * 1e3:.2f} ms fwd+bwd")
        except RuntimeError as exc:
            print(f"  {name}: {type(exc).__name__}: {str(exc)[:200]}")


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
    ap.add_argument("--mask-mode", nargs="+", default=["auto"],
                    help="one or more of auto | blocks | table | bias | window, timed side by side; auto = "
                         "the store's per-slice K/V blocks, one fused call each, merged by log-sum-exp; "
                         "table/bias = one SDPA call over a concatenated window with a mask; window = the "
                         "former whole-sequence buffer with the two-block kernel")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="process: CPU time, for CPU runs with OMP_NUM_THREADS=1 on a busy machine")
    ap.add_argument("--explain", action="store_true",
                    help="CUDA: which fused kernels take the last slice's lower-right call, and their cost")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    shape_q = (1, args.seq, args.heads, args.head_dim)
    shape_kv = (1, args.seq, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
    dout = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
    if args.explain:
        explain(q, k, v, max(args.slices), args.repeat)
    masks = {mode: (None if mode == "window" else MaskCache(mode)) for mode in args.mask_mode}
    ref = unsliced(q, k, v, dout)
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {threads}, s={args.seq}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, {args.dtype}; {args.clock} clock, median of {args.repeat}, "
          "variants timed round-robin\n")
    cols = "".join(f" {mode} ms | ÷ unsliced |" for mode in masks)
    print(f"| slices n | unsliced ms |{cols} max |out − unsliced| |")
    print("|---|---|" + "---|---|" * len(masks) + "---|")
    for n in args.slices:
        fns = {"unsliced": lambda: unsliced(q, k, v, dout)}
        diff = 0.0
        for mode, mc in masks.items():
            fn = (lambda n=n: windowed(q, k, v, dout, n)) if mc is None else (
                lambda mc=mc, n=n: sliced(q, k, v, dout, n, mc))
            diff = max(diff, float((fn().float() - ref.float()).abs().max()))
            fns[mode] = fn
        t = _time_many(fns, device, args.repeat, args.clock)
        row = "".join(f" {t[mode] * 1e3:.1f} | {t[mode] / t['unsliced']:.2f} |" for mode in masks)
        print(f"| {n} | {t['unsliced'] * 1e3:.1f} |{row} {diff:.2e} |", flush=True)
    if device.type == "cuda":
        print(f"\npeak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
