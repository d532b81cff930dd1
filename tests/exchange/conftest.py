"""The exchange tests reuse the runtime tests' helpers (tiny models, fork/FileStore gloo harness)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
torch.set_num_threads(1)  # forked children hang with more than one OpenMP thread (platform §6)
