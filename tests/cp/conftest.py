"""Context-parallel tests fork ranks: one OpenMP thread (forked children hang otherwise, platform §6)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
