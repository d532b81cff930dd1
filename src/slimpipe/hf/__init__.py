"""Hugging Face Llama checkpoints in and out (docs/hf.md).

* :mod:`slimpipe.hf.config` (no torch): config.json ↔ ModelConfig, the tensor-name map, safetensors headers
  checked before anything is read;
* :mod:`slimpipe.hf.weights`: each rank reads the slices it holds (``--init-from``);
* :mod:`slimpipe.hf.export`: a training checkpoint (any layout) → a directory ``transformers`` loads.

Needs the ``hf`` extra (``pip install 'slimpipe[hf]'``: safetensors, tokenizers).
"""

from __future__ import annotations

from slimpipe.hf.config import HFCheckpoint, hf_config_dict, model_from_hf, open_checkpoint

__all__ = ["HFCheckpoint", "open_checkpoint", "model_from_hf", "hf_config_dict"]
