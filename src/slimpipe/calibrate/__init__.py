"""`slimpipe calibrate`: measure what the cost model needs on this machine and write a profile JSON.

Measured, each as a function of the shapes the model uses (docs/calibrate.md):

* every linear layer of the model (forward; backward = dX + dW) at a few token counts;
* sliced causal attention through the runtime's own kernel path (``slice_attention``: the own block
  square causal, one call per earlier slice's K/V block, merged by log-sum-exp) over a grid of slice
  length T and prefix length P, fitted per direction as ``a + c(T)·F_diagonal`` at P = 0 and
  ``+ m(T) + b(T)·F_prefix`` after a prefix, curves over T;
* the elementwise ops of a block (norms, RoPE, SwiGLU gate, residuals), the embedding and the loss per token;
* point-to-point latency and bandwidth between two processes, and the rank time each message costs its
  sender and its receiver (gloo over fork on CPU; on CUDA one GPU cannot host a 2-rank NCCL pipeline, so a
  device-to-device copy stands in, the cluster links come from the matching preset and the message costs
  are 0);
* whole units run by the runtime (LocalPipelineRuntime): their F/B times fit the composition factor κ and
  the per-action overhead that tie the kernel sum to what the executor really takes (CPU: per action
  from the trace; CUDA: per step, since the trace times only the asynchronous launches);
* the runtime's saved activation bytes per token (first, middle and last stage, per layer).

Single-threaded CPU runs are timed in thread CPU time, so other processes' load does not leak into the
profile (it describes this machine without other users); CUDA and multi-threaded runs in wall time.
The command module imports this package lazily (it imports torch).

Modules: ``measure`` (kernels), ``comm`` (p2p), ``units`` (runtime units, footprint), ``fit`` (profile
fields, consistency), ``run`` (the whole run).
"""

from __future__ import annotations

from slimpipe.calibrate.comm import fork_gloo
from slimpipe.calibrate.fit import unit_consistency
from slimpipe.calibrate.measure import Progress
from slimpipe.calibrate.run import GRIDS, CalibrateOptions, calibrate
from slimpipe.calibrate.units import _measure_footprint, benchmark_runtime  # noqa: F401  (scripts/gpu_check.sh)

__all__ = ["CalibrateOptions", "calibrate", "fork_gloo", "unit_consistency", "benchmark_runtime", "Progress",
           "GRIDS"]
