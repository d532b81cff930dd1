"""Decoder models the runtime pipelines: the user-model contract and the Llama family. Imports torch."""

from __future__ import annotations

from slimpipe.models.base import DecoderParts, LayerContext, PlainContext, init_parameters, param_generator
from slimpipe.models.llama import LlamaParts

__all__ = ["DecoderParts", "LayerContext", "PlainContext", "LlamaParts", "init_parameters", "param_generator"]
