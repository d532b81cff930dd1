"""Training data: the batch of a step depends only on (seed, step), never on the layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slimpipe.train.config import TrainConfig, field_docs
from slimpipe.train.data import load_data, stdlib_corpus


def test_batches_depend_only_on_seed_and_step(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)
    data = load_data(str(tmp_path / "t.txt"), vocab_size=256, seq_len=32)
    a = data.batch(3, seed=7, batch=4, seq_len=32)
    assert a.shape == (4, 33) and a.dtype == np.int64
    np.testing.assert_array_equal(a, data.batch(3, seed=7, batch=4, seq_len=32))
    assert not np.array_equal(a, data.batch(4, seed=7, batch=4, seq_len=32))
    assert not np.array_equal(a, data.batch(3, seed=8, batch=4, seq_len=32))
    # consecutive bytes of the file: each row is a window of the text
    assert all(((row[1:] - row[:-1]) % 256 == 1).all() for row in a)


def test_token_file_dtypes(tmp_path: Path) -> None:
    ids = np.arange(1000, dtype=np.uint32) * 60  # up to 59940: fits uint16
    ids.astype(np.uint16).tofile(tmp_path / "a.bin")
    data = load_data(str(tmp_path / "a.bin"), vocab_size=65536, seq_len=10)
    assert data.tokens.dtype == np.uint16 and data.num_tokens == 1000
    ids.tofile(tmp_path / "b.bin")
    data = load_data(str(tmp_path / "b.bin"), vocab_size=128256, seq_len=10)  # auto: uint32 above 65536
    assert data.tokens.dtype == np.uint32 and int(data.tokens[-1]) == 999 * 60
    assert load_data(str(tmp_path / "b.bin"), vocab_size=65536, seq_len=10, data_dtype="uint32").num_tokens == 1000


def test_synthetic_is_a_permutation_walk() -> None:
    data = load_data("synthetic", vocab_size=256, seq_len=16)
    b = data.batch(1, seed=0, batch=8, seq_len=16)
    nxt: dict[int, int] = {}
    for row in b:
        for x, y in zip(row[:-1], row[1:]):
            assert nxt.setdefault(int(x), int(y)) == int(y)  # the next token is a function of the previous


def test_stdlib_corpus_is_deterministic() -> None:
    a, root = stdlib_corpus()
    b, _ = stdlib_corpus()
    assert len(a) > 1_000_000 and np.array_equal(a[:4096], b[:4096]) and np.array_equal(a[-4096:], b[-4096:])
    assert "site-packages" not in root
    assert load_data("stdlib", vocab_size=256, seq_len=2048).fingerprint == load_data(
        "stdlib", vocab_size=256, seq_len=8).fingerprint


def test_every_field_is_documented_and_resolves() -> None:
    docs = field_docs()
    assert set(docs) == set(TrainConfig.__dataclass_fields__), "each TrainConfig field needs a docstring"
    cfg = TrainConfig(out_dir="x").resolved()
    assert cfg.log_json == str(Path("x/metrics.jsonl")) and cfg.checkpoint_dir == str(Path("x/checkpoints"))
    assert TrainConfig().resolved().out_dir.startswith("runs/train-")


@pytest.mark.parametrize("step", [1, 5, 6, 40])
def test_lr_schedule(step: int) -> None:
    pytest.importorskip("torch")
    from slimpipe.train.trainer import lr_at

    cfg = TrainConfig(lr=1.0, lr_warmup=5, steps=40, min_lr_ratio=0.1)
    lr = lr_at(step, cfg)
    expect = {1: 0.2, 5: 1.0, 40: 0.1}
    if step in expect:
        assert lr == pytest.approx(expect[step])
    else:
        assert 0.1 < lr < 1.0
