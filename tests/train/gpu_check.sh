#!/usr/bin/env bash
# GPU checks of `slimpipe train` (one CUDA device: local pipeline and world-1 NCCL). Not run by CI.
# Usage: OUT=/some/dir bash tests/train/gpu_check.sh   (from the repository root; results under $OUT)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/slimpipe-gpu}
mkdir -p "$O"
T="python -m slimpipe train --no-progress --device cuda"
run() { local name=$1; shift; local t0=$SECONDS; timeout 100 "$@" > "$O/$name.log" 2>&1; echo "$name rc=$? ${SECONDS}s" | tee -a "$O/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total --format=csv > "$O/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$O/gpu.txt" 2>&1
# 1. the embedded default on one GPU (every stage in one process), fp32, with a checkpoint and a trace
run default_local $T --local-pipeline --steps 4 --out-dir "$O/a" --checkpoint-every 2 --trace "$O/a/trace.json"
# 2. crash at step 3 (test hook), then resume: compare with run 1
run crash env SLIMPIPE_FAULT_RANK=0 SLIMPIPE_FAULT_STEP=3 $T --local-pipeline --steps 4 --out-dir "$O/b" --checkpoint-every 2
run resume $T --local-pipeline --steps 4 --out-dir "$O/b" --checkpoint-every 2 --resume
# 3. world-1 NCCL process group (PipelineRuntime, pp=1, 4 slices)
run nccl_pp1 $T --pp 1 --slices 4 --steps 3 --out-dir "$O/d"
# 4. bf16 MFU: ~1.2B Llama, 16K tokens per sequence, local pipeline pp=2, 8 slices
run llama1b_bf16 $T --local-pipeline --model llama-1b --data synthetic --seq-len 16384 --global-batch 4 \
    --pp 2 --slices 8 --dtype bfloat16 --steps 4 --lr 3e-4 --out-dir "$O/c"
python - "$O" <<'EOF' >> "$O/summary.txt" 2>&1
import json, sys
from pathlib import Path
o = Path(sys.argv[1])
def losses(p): return [json.loads(l)["loss"] for l in open(p)] if Path(p).exists() else None
a, b = losses(o / "a/metrics.jsonl"), losses(o / "b/metrics.jsonl")
print("default losses", a)
print("resumed losses", b, "equal" if a == b else "DIFFER")
for run in ("c", "d"):
    p = o / run / "metrics.jsonl"
    if p.exists():
        last = json.loads(p.read_text().splitlines()[-1])
        print(run, {k: last[k] for k in ("loss", "step_time_s", "tokens_per_s", "mfu", "mfu_dense",
                                         "bubble_ratio", "peak_activation_bytes", "max_allocated_bytes")})
EOF
cat "$O/summary.txt"
