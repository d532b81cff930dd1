"""`slimpipe train`: a trainer on the SlimPipe runtime (launch, data, checkpoints, logging).

Importing this package is cheap (no torch): the config and preflight checks are torch-free; the trainer,
launcher and checkpoint code import torch when used. Programmatic use::

    from slimpipe.train import TrainConfig, train
    exit_code = train(TrainConfig(model="tiny", data="synthetic", seq_len=128, steps=3))
"""

from __future__ import annotations

from slimpipe.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig) -> int:
    """Check ``cfg`` (raises ConfigError), start the ranks it needs, return the exit code (0 = success)."""
    from slimpipe.train.launch import launch
    from slimpipe.train.preflight import preflight, torchrun_env

    env = torchrun_env()
    return launch(preflight(cfg, env=env, check_outputs=env is None or env.rank == 0), env=env)
