"""Cost model, memory model and discrete-event simulator for pipeline schedules. Imports no torch.

Typical use (what `slimpipe simulate` does)::

    from slimpipe.config import ParallelConfig, load_model
    from slimpipe.sim import Workload, evaluate, load_hardware

    wl = Workload(model=load_model("llama-70b"), parallel=ParallelConfig(tp=4, cp=2, pp=16, slices=16, vpp=5),
                  seq_len=524288, global_batch=8, recompute="partial+fc1", vocab_parallel=True)
    ev = evaluate(wl, "slimpipe", hardware=load_hardware("h800"))   # build → lower → simulate → memory
    ev.report.bubble_ratio, ev.report.memory[0].peak

The pieces compose by hand too: ``simulate(schedule, cost)`` gives a Timeline for any lowered schedule and
any CostModel; ``memory_model(workload, schedule)`` the per-rank memory.

See docs/simulate.md for the formulas and their assumptions.
"""

from __future__ import annotations

from slimpipe.sim.cost import AnalyticCost, CostModel, UniformCost
from slimpipe.sim.evaluate import Evaluation, evaluate
from slimpipe.sim.flops import layer_flops, seq1f1b_partition
from slimpipe.sim.hardware import HARDWARE_PRESETS, Hardware, load_hardware
from slimpipe.sim.memory import MemoryBreakdown, memory_model, peak_inflight
from slimpipe.sim.metrics import MFU_CONVENTION, Report, memory_curve, summarize
from slimpipe.sim.simulator import DeadlockError, Timeline, simulate
from slimpipe.sim.workload import RECOMPUTE_MODES, Workload

__all__ = [
    "AnalyticCost", "CostModel", "UniformCost", "layer_flops", "seq1f1b_partition",
    "HARDWARE_PRESETS", "Hardware", "load_hardware", "MemoryBreakdown", "memory_model", "peak_inflight",
    "MFU_CONVENTION", "Report", "memory_curve", "summarize", "DeadlockError", "Timeline", "simulate",
    "RECOMPUTE_MODES", "Workload", "Evaluation", "evaluate",
]
