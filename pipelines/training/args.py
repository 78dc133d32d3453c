"""The command line of adapter training, shared by ``jobs/train_adapters.py`` and ``dreamcache train-adapters``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast. The run's options are
``TrainingConfig``'s fields, then ``ScaleConfig``'s (the Ray Train options).
"""

from __future__ import annotations

import argparse

from dreamcache.cli_args import add_config_arguments, config_from_namespace
from dreamcache.training_config import TrainingConfig

from ..kernel.ray_runtime import add_ray_address_argument
from .config import ScaleConfig


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainingConfig)
    add_config_arguments(p, ScaleConfig)
    add_ray_address_argument(p)
    p.add_argument("--no-ray", action="store_true", help="train in this process (local data path, exact resume)")


def training_from_args(args: argparse.Namespace) -> tuple[TrainingConfig, ScaleConfig]:
    config = config_from_namespace(TrainingConfig, args)
    scale = config_from_namespace(ScaleConfig, args, ray_address=args.ray_address)
    config.validate()
    scale.validate()
    return config, scale
