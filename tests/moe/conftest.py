"""MoE tests fork gloo ranks: one OpenMP thread first (forked children hang otherwise, platform §6)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
