"""Session fixtures: the Hugging Face assets are made once (transformers imported once per session)."""

from __future__ import annotations

import pytest
import torch

import tests.support.hf as hs

torch.set_num_threads(1)  # forked children hang with more OpenMP threads (platform §6)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    return {
        "tok": hs.make_tokenizer(root / "tok"),
        "jsonl": hs.make_jsonl(root / "docs.jsonl"),
        "llama3": hs.make_llama(root / "llama3", hs.LLAMA3, seed=1, shard="40KB"),
        "tied": hs.make_llama(root / "tied", hs.TIED, seed=2),
        "tp2": hs.make_llama(root / "tp2", hs.TP2, seed=3, shard="60KB"),
    }
