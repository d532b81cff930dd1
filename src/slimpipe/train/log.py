"""Per-step metrics: the rank-0 step line, a progress bar, the JSON-lines log, MFU.

MFU convention (``ModelConfig.flops_per_token``, the simulator's and the planner's): ``mfu`` counts the FLOPs
the hardware executes, 6·N + 6·L·H·Q·T per token (N parameters without the input embedding, H heads,
Q head_dim, T sequence length; causal attention counted as executed, QKᵀ and AV forward + backward);
``mfu_dense`` is the PaLM/torchtitan 6·N + 12·L·H·Q·T (attention as if unmasked). MFU = FLOPs/token ·
tokens/s / (processes · peak FLOP/s of one process).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any


__all__ = ["StepLogger", "format_step", "measure_peak_flops", "MIB"]

MIB = 1 << 20


def measure_peak_flops(dtype: Any, device: Any) -> tuple[float, str]:
    """(peak FLOP/s of this process, how it was obtained): datasheet for known GPUs, else a matmul."""
    import torch

    if device.type == "cuda":
        from slimpipe.sim.hardware import HARDWARE_PRESETS

        name = torch.cuda.get_device_name(device).lower()
        for key, hw in HARDWARE_PRESETS.items():
            if key in name and dtype == torch.bfloat16:
                return hw.peak_flops, f"{key} datasheet bf16"
    # Best of a few square matmuls in the run's dtype: an achievable peak, not a datasheet one.
    size = 4096 if device.type == "cuda" else 512
    a = torch.randn(size, size, dtype=dtype, device=device)
    a @ a  # warm-up: kernel selection, thread pool start
    best = 0.0
    for _ in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best, f"measured {size}³ {str(dtype).removeprefix('torch.')} matmul, {torch.get_num_threads()} thread(s)"


def format_step(rec: dict[str, Any], steps: int) -> str:
    """One torchtitan-style line."""
    act = ", ".join(f"{b / MIB:.1f}" for b in rec["peak_activation_bytes"])
    off = rec.get("peak_offloaded_bytes") or []
    if any(off):  # activation offload: resident bytes above, host bytes here
        act += "] MiB  offloaded [" + ", ".join(f"{b / MIB:.1f}" for b in off)
    width = len(str(steps))
    return (
        f"step {rec['step']:>{width}}/{steps}  loss {rec['loss']:.4f}  grad_norm {rec['grad_norm']:.3f}  "
        f"lr {rec['lr']:.2e}  tps {rec['tokens_per_s']:,.0f}  mfu {100 * rec['mfu']:.1f}%  "
        f"bubble {100 * rec['bubble_ratio']:.1f}%  act/stage [{act}] MiB  {rec['step_time_s']:.2f}s"
    )


class StepLogger:
    """Rank 0's outputs: step lines (stdout), a progress bar (stderr, TTY only), JSON lines to a file.

    The JSON log is written to ``<path>.partial`` and renamed over ``path`` by ``finish()``, so a run that
    fails never replaces an earlier log. On resume the earlier log's records up to the resumed step are
    carried over first.
    """

    def __init__(self, path: str, *, steps: int, start_step: int, log_every: int, progress: bool,
                 out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.steps, self.log_every = steps, log_every
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.bar = progress and self.err.isatty()
        self.t0 = time.perf_counter()
        self.first_step = start_step + 1
        self.records: list[dict[str, Any]] = []
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        carried = self._carried(start_step)
        self.file = self.partial.open("w")
        self.file.writelines(carried)
        self.file.flush()

    def _carried(self, start_step: int) -> list[str]:
        """Records up to the resumed step from the earlier log (or the .partial a crashed run left)."""
        source = self.path if self.path.is_file() else self.partial
        if not start_step or not source.is_file():
            return []
        lines = [ln for ln in source.read_text().splitlines() if ln.strip()]
        return [ln + "\n" for ln in lines if json.loads(ln)["step"] <= start_step]

    def log(self, rec: dict[str, Any]) -> None:
        keys = ("step", "loss", "step_time_s", "tokens_per_s", "skipped")
        self.records.append({k: rec.get(k) for k in keys})
        self.file.write(json.dumps(_strict(rec), allow_nan=False) + "\n")  # nan/inf → null: strict JSON
        self.file.flush()
        step = rec["step"]
        if step % self.log_every == 0 or step == self.steps or step == self.first_step:
            self._clear_bar()
            print(format_step(rec, self.steps), file=self.out, flush=True)
        self._draw_bar(step)

    def summary(self) -> str:
        """One line on the whole run: loss first → last, mean step time and throughput."""
        if not self.records:
            return "no steps run"
        first, last = self.records[0], self.records[-1]
        mean_t = sum(r["step_time_s"] for r in self.records) / len(self.records)
        mean_tps = sum(r["tokens_per_s"] for r in self.records) / len(self.records)
        skipped = sum(1 for r in self.records if r["skipped"])
        note = f"; {skipped} step(s) skipped (loss or grad norm not finite)" if skipped else ""
        return (f"steps {first['step']}–{last['step']} in {_hms(time.perf_counter() - self.t0)}: loss "
                f"{first['loss']:.4f} → {last['loss']:.4f}, mean step {mean_t:.2f} s, "
                f"{mean_tps:,.0f} tokens/s{note}")

    def print(self, text: str) -> None:
        self._clear_bar()
        print(text, file=self.out, flush=True)

    def finish(self) -> None:
        """Close the log and move it into place (success only)."""
        self._clear_bar()
        self.file.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        """Close without publishing (a failed run leaves ``<path>.partial`` for inspection)."""
        self._clear_bar()
        if not self.file.closed:
            self.file.close()

    def _draw_bar(self, step: int) -> None:
        if not self.bar:
            return
        done = step - self.first_step + 1
        todo = self.steps - self.first_step + 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (todo - done)
        fill = math.floor(30 * done / todo)
        self.err.write(f"\r[{'#' * fill}{'.' * (30 - fill)}] {step}/{self.steps}  eta {_hms(eta)}")
        self.err.flush()

    def _clear_bar(self) -> None:
        if self.bar:
            self.err.write("\r\033[K")
            self.err.flush()


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
