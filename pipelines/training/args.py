"""The command line of adapter training, shared by ``jobs/train_adapters.py`` and ``dreamcache train-adapters``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast. The run's options are
``TrainingConfig``'s fields; the Ray Train options below are ``pipelines.training.job.ScaleConfig``'s.
"""

from __future__ import annotations

import argparse

from dreamcache.cli_args import add_config_arguments
from dreamcache.training_config import TrainingConfig

from ..kernel.ray_runtime import add_ray_address_argument


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainingConfig)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--data-cpus", type=float, default=0.5, help="CPUs per Ray Data preparation task")
    p.add_argument("--max-failures", type=int, default=0, help="restarts of a failed worker group (each resumes)")
    p.add_argument("--ray-storage", help="where Ray Train keeps the run folder and its checkpoints (default: --out)")
    add_ray_address_argument(p)
    p.add_argument("--no-ray", action="store_true", help="train in this process (local data path, exact resume)")
