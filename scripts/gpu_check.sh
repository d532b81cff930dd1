#!/usr/bin/env bash
# Every GPU check of slimpipe in one run (≤ 6 min on one H200); results under $OUT (default ./gpu_out).
#
#   a. calibrate       slimpipe calibrate --device cuda (llama-1b shapes, bf16) -> profile.json
#   b. attention       sliced (n slices through the runtime's K/V store, causal_lower_right) vs unsliced
#                      causal attention at 64K (llama-1b heads) and 128K tokens, bf16, forward+backward,
#                      with bench/attention_bench.py -> attention.log, attention_128k.log
#   c. memory          LocalPipelineRuntime, llama-1b, 4 stages, bf16, slimpipe and 1f1b at long context:
#                      per-stage peak memory (runtime accounting; CUDA allocator deltas attributed per stage)
#                      vs the simulator (runtime-format walk with the calibrated footprint; published
#                      formula) -> memory.jsonl
#   d. gradients       float64 gradient equivalence on CUDA, local executor vs the unsliced reference
#                      -> gradients.jsonl
#
# Each part runs in its own python process under its own time limit; a failure is logged (traceback in
# $OUT/<part>.log) and the next part still runs. $OUT/summary.txt lists every part's exit code and time.
#
#   OUT=/tmp/gpu_out scripts/gpu_check.sh            # on the GPU machine (PYTHONPATH=src, nothing installed)
#   scripts/gpu_check.sh --dry-run                    # CPU, tiny sizes: exercises every code path in < 60 s
set -u
case "${1:-}" in
  ""|--dry-run) ;;
  *) echo "gpu_check.sh: unknown argument '$1'; use no argument (GPU run) or --dry-run (CPU, tiny sizes)" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DRY=0
SCALE=1
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  SCALE=3  # the limits are sized for the GPU; a shared CPU machine may be several times slower
  export OMP_NUM_THREADS=1  # tiny CPU kernels: one thread is faster and steadier on a shared machine
fi
export OUT DRY
: > "$OUT/summary.txt"

part() {  # part NAME LIMIT_S CMD...: run, log, record exit code and seconds, never abort the script
  local name=$1 limit=$(( $2 * SCALE )) start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

{ date; uname -a; nvidia-smi 2>&1 | head -15
  $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

if [ "$DRY" = 1 ]; then
  part calibrate 60 $PY -m slimpipe calibrate --device cpu --quick --threads 1 -o "$OUT/profile.json"
else
  part calibrate 100 $PY -m slimpipe calibrate --device cuda -o "$OUT/profile.json"
fi

# ---- b: sliced vs unsliced causal attention (bench/attention_bench.py: through the runtime's K/V store) ----
if [ "$DRY" = 1 ]; then
  part attention 40 $PY bench/attention_bench.py --device cpu --seq 512 --slices 1 4 --repeat 2 --mask-mode auto bias
else
  # llama-1b heads (GQA 32/8, head_dim 64) at 64K; --explain says which fused kernels take the lower-right
  # mask with GQA and what expanding the K/V heads would cost instead.
  part attention 45 $PY bench/attention_bench.py --device cuda --dtype bfloat16 --seq 65536 --heads 32 \
    --kv-heads 8 --head-dim 64 --slices 1 4 16 64 --repeat 3 --mask-mode auto bias --explain
  part attention_128k 35 $PY bench/attention_bench.py --device cuda --dtype bfloat16 --seq 131072 --heads 16 \
    --kv-heads 16 --head-dim 128 --slices 1 8 32 --repeat 2 --mask-mode auto
  part attention_gpu_tests 60 $PY -m pytest -q -m gpu tests/runtime/test_attention_window.py
fi

# ---- c: per-stage memory of llama-1b on 4 stages vs the simulator -----------------------------------------
part memory 130 $PY - <<'EOF'
import json, os, sys, time, traceback
import torch
sys.path.insert(0, "bench")
from validate_sim import predict_activation
from slimpipe.calibrate import benchmark_runtime  # random weights drawn on the device: seconds, not minutes
from slimpipe.config import ParallelConfig, load_model
from slimpipe.schedule.builders import build
from slimpipe.sim.hardware import load_profile
from slimpipe.sim.memory import memory_model
from slimpipe.sim.workload import Workload

dry, out = os.environ["DRY"] == "1", os.environ["OUT"]
dev, dt = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
base_cfg = load_model("tiny" if dry else "llama-1b")
p = 4
# (schedule, s, n, m, layers): all 4 stages share one GPU, so a run must fit the SUM of the stages; the
# 64K rows use 8 of llama-1b's 16 layers (2 per stage). Runs predicted not to fit are skipped, not tried.
runs = ([("slimpipe", 256, 8, 2, 8), ("1f1b", 256, 1, 2, 8)] if dry else
        [("slimpipe", 32768, 8, 2, 16), ("1f1b", 16384, 1, 4, 16), ("slimpipe", 65536, 16, 2, 8),
         ("1f1b", 32768, 1, 4, 8), ("1f1b", 32768, 1, 2, 16), ("slimpipe", 65536, 16, 2, 16)])
try:
    fp = load_profile(os.path.join(out, "profile.json")).profile.footprint
    source = "profile.json"
except Exception:  # part a failed: measure the footprint here
    import time
    from slimpipe.calibrate.measure import Progress, _Ctx
    from slimpipe.calibrate.units import _measure_footprint
    ctx = _Ctx(dev=torch.device(dev), dt=dt, reps=1, clock=time.perf_counter, bar=Progress(1))
    fp = _measure_footprint(base_cfg, 256 if dry else 2048, ctx)
    source = "measured here"
total = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 0

if dev == "cuda":
    def mem_start(rt):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    def mem_end(rt):
        return torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
else:  # dry run: the runtime's own byte counts stand in for the allocator (same bookkeeping code path)
    def mem_start(rt):
        return sum(ex.tracker.current + sum(ex.store.nbytes()) for ex in rt.executors if ex.store)
    def mem_end(rt):
        now = mem_start(rt)
        return now, now

def attribute(rt, live, peak):
    """Per-stage allocator deltas: each action's allocations are charged to the rank that ran it."""
    for r, ex in enumerate(rt.executors):
        orig = ex._execute
        def run(idx, action, r=r, orig=orig):
            before = mem_start(rt)
            orig(idx, action)
            top, after = mem_end(rt)
            peak[r] = max(peak[r], live[r] + top - before)
            live[r] += after - before
            peak["process"] = max(peak["process"], top)
        ex._execute = run

with open(os.path.join(out, "memory.jsonl"), "w") as fh:
    for name, s, n, m, layers in runs:
        cfg = base_cfg.replace(num_layers=layers)
        row = {"schedule": name, "seq_len": s, "slices": n, "microbatches": m, "pp": p, "model": cfg.name,
               "layers": layers, "footprint_source": source}
        try:
            sched = build(name, p=p, m=m, n=n)
            walk = predict_activation(sched, cfg, s, fp)
            wl = Workload(model=cfg, parallel=ParallelConfig(pp=p, slices=n), seq_len=s, global_batch=m)
            pub = [mb.activations + mb.kv_grad for mb in memory_model(wl, sched)]
            row.update(predicted_walk_gib=[x / 2**30 for x in walk], published_gib=[x / 2**30 for x in pub])
            logits = s / n * cfg.vocab_size * 12  # bf16 logits + fp32 copy + fp32 gradient of one slice
            if dev == "cuda" and sum(walk) + logits + 4 * cfg.num_params() > 0.9 * total:
                row["skipped"] = f"predicted {(sum(walk) + logits) / 2**30:.0f} GiB of activations for all 4 stages on one GPU"
                raise RuntimeError(row["skipped"])
            rt = benchmark_runtime(cfg, sched, dt, torch.device(dev))
            toks = torch.randint(0, cfg.vocab_size, (m, s + 1))
            live, peak = [0] * p, {r: 0 for r in range(p)} | {"process": 0}
            base = torch.cuda.memory_allocated() if dev == "cuda" else 0
            attribute(rt, live, peak)
            t0 = time.perf_counter()
            res = rt.forward_backward(toks)
            if dev == "cuda":
                torch.cuda.synchronize()
            row.update(alloc_stage_peak_gib=[peak[r] / 2**30 for r in range(p)],
                       alloc_process_peak_gib=peak["process"] / 2**30, weights_gib=base / 2**30,
                       alloc_source="torch.cuda allocator" if dev == "cuda" else "runtime byte counts (dry run)")
            row.update(step_s=time.perf_counter() - t0, loss=res.loss,
                       runtime_activation_gib=[x / 2**30 for x in res.peak_activation_bytes],
                       runtime_saved_gib=[x / 2**30 for x in res.peak_saved_bytes],
                       runtime_kv_gib=[x / 2**30 for x in res.peak_kv_bytes],
                       walk_over_runtime=[w / a for w, a in zip(walk, res.peak_activation_bytes)],
                       published_over_runtime=[q / a for q, a in zip(pub, res.peak_activation_bytes)])
        except Exception as exc:
            row.setdefault("error", f"{type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()
        finally:
            rt = res = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        fh.write(json.dumps(row) + "\n"); fh.flush()
EOF

# ---- d: gradient equivalence on CUDA (float64) -------------------------------------------------------------
part gradients 35 $PY - <<'EOF'
import json, os
import torch
from slimpipe.config import ModelConfig
from slimpipe.runtime import LocalPipelineRuntime, build_reference, reference_loss
from slimpipe.schedule.builders import build

dev = "cpu" if os.environ["DRY"] == "1" else "cuda"
cfg = ModelConfig(name="smoke", num_layers=4, hidden=64, ffn=128, num_heads=4, num_kv_heads=2, head_dim=16,
                  vocab_size=128)
toks = torch.randint(0, cfg.vocab_size, (2, 129), generator=torch.Generator().manual_seed(0))
ref = build_reference(cfg, seed=0, dtype=torch.float64, device=dev)
ref_loss = reference_loss(ref, toks.to(dev))
ref_loss.backward()
ref_loss = ref_loss.item()
want = {n: q.grad for n, q in ref.named_parameters()}
with open(os.path.join(os.environ["OUT"], "gradients.jsonl"), "w") as fh:
    for name, n, v in [("1f1b", 1, 1), ("slimpipe", 4, 1), ("slimpipe", 4, 2), ("interleaved-1f1b", 1, 2),
                       ("seq1f1b", 4, 1)]:
        row = {"schedule": name, "slices": n, "vpp": v, "device": dev}
        try:
            rt = LocalPipelineRuntime(cfg, build(name, p=2, m=2, n=n, v=v), dtype=torch.float64, device=dev)
            res = rt.forward_backward(toks, reduce_grads=True)
            err = max(float((q.grad - want[k]).abs().max() / want[k].abs().max()) for k, q in rt.named_parameters())
            row.update(loss_rel_diff=abs(res.loss - ref_loss) / abs(ref_loss), max_grad_rel_err=err,
                       ok=err < 1e-9)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        print(json.dumps(row), flush=True)
        fh.write(json.dumps(row) + "\n")
EOF

echo "results in $OUT:"; ls -l "$OUT"; cat "$OUT/summary.txt"
