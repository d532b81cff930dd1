"""Tiny Hugging Face assets for the tests: a BPE tokenizer trained on stdlib text, JSONL documents, and
random ``LlamaForCausalLM`` checkpoints saved locally (the oracle: transformers itself, offline).

transformers is imported only inside these functions (~5 s): the session fixtures in conftest.py call
them once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300
DOCS = 40


def documents() -> list[str]:
    import pydoc_data.topics as topics

    return [text for _, text in sorted(topics.topics.items())][:DOCS]


def make_tokenizer(root: Path) -> Path:
    """A byte-level BPE of VOCAB tokens with an <eos> special token, saved as a tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(), trainer)
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return root


def make_jsonl(path: Path) -> Path:
    with open(path, "w") as fh:
        for d in documents():
            fh.write(json.dumps({"text": d}) + "\n")
    return path


# Untied, GQA, Llama-3.1 rope scaling, saved in several files with an index; and tied with plain RoPE.
LLAMA3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16})
# Tensor-parallel at t = 2: every head, K/V head, FFN and vocabulary count divides by 2; plain RoPE (fp64 oracle).
TP2 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)
TIED = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def make_llama(root: Path, fields: dict, *, seed: int, shard: str | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    with torch.no_grad():  # larger weights than HF's 0.02 init: logits far from uniform, a sharper test
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(root, **kw)
    return root


def oracle(path: Path, dtype: torch.dtype = torch.float32):
    """The saved checkpoint loaded by transformers. In float64 two float32 casts of transformers' Llama are
    lifted (it computes RoPE angles and RMSNorm statistics in float32 whatever the model dtype, a 1e-7
    error that would hide everything a 1e-10 comparison is for): same formulas, float64 throughout.
    Plain RoPE only in float64 (the llama3 scaling is checked in float32, untouched)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if dtype == torch.float64:
        cfg = model.config
        assert cfg.rope_parameters.get("rope_type", "default") == "default"
        theta, d = cfg.rope_parameters["rope_theta"], cfg.head_dim
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

        def rope(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = position_ids[..., None].double() * inv
            emb = torch.cat((f, f), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        model.model.rotary_emb.forward = rope
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = _rms_norm_fp64(module)
    return model


def _rms_norm_fp64(module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    return forward


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def hf_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of tokens (B, s+1) under a transformers model: inputs [:-1], labels [1:]."""
    logits = model(tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
