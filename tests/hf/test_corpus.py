"""Token corpora: a tokenizer round trip with EOS between documents, the cache next to the data, .npy
memory-mapped arrays, and the evaluation windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tests.support.hf as hs
from slimpipe.config import ConfigError
from slimpipe.train.corpus import cache_paths, load_tokenizer, tokenize_corpus
from slimpipe.train.data import load_data


@pytest.mark.timeout(120)
def test_tokenizer_round_trip_and_cache(assets, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_bytes(assets["jsonl"].read_bytes())
    tok, eos = load_tokenizer(str(assets["tok"]))
    td = load_data(str(data), vocab_size=hs.VOCAB, seq_len=16, tokenizer=str(assets["tok"]))
    tokens, docs = np.asarray(td.tokens), td.docs
    assert isinstance(td.tokens, np.memmap) and td.tokens.dtype == np.uint16
    texts = hs.documents()
    assert len(docs) == len(texts) and docs[0] == 0
    ends = [*docs[1:], len(tokens)]
    for text, a, b in zip(texts, docs, ends):
        assert tokens[b - 1] == eos and eos not in tokens[a : b - 1]  # EOS after every document, only there
        assert tok.decode(tokens[a : b - 1].tolist()) == text  # the round trip
    cached, _ = cache_paths(data, str(assets["tok"]), "text")
    stamp = cached.stat().st_mtime_ns
    again = load_data(str(data), vocab_size=hs.VOCAB, seq_len=16, tokenizer=str(assets["tok"]))
    assert cached.stat().st_mtime_ns == stamp and np.array_equal(np.asarray(again.tokens), tokens)
    assert again.fingerprint == td.fingerprint
    k = td.eval_windows(16)
    assert k == (len(tokens) - 1) // 16
    w = td.windows(k - 1, 1, 16)
    assert w.shape == (1, 17) and np.array_equal(w[0], tokens[(k - 1) * 16 : k * 16 + 1])


@pytest.mark.timeout(30)
def test_npy_and_jsonl_errors(assets, tmp_path):
    arr = tmp_path / "t.npy"
    np.save(arr, np.arange(1000, dtype=np.int32) % 77)
    td = load_data(str(arr), vocab_size=77, seq_len=8)
    assert isinstance(td.tokens, np.memmap) and td.num_tokens == 1000
    with pytest.raises(ConfigError, match="token id 76"):
        load_data(str(arr), vocab_size=76, seq_len=8)
    np.save(arr, np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(ConfigError, match="2-D"):
        load_data(str(arr), vocab_size=77, seq_len=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: .*'text'"):
        load_data(str(bad), vocab_size=hs.VOCAB, seq_len=8, tokenizer=str(assets["tok"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "t.npy"]  # no half-written cache
