"""The command line of the DreamBench evaluation, shared by ``jobs/evaluate.py`` and ``dreamcache evaluate``:
``EvaluationConfig``'s fields (``dreamcache.cli_args``). Light on purpose: no Ray, torch or diffusers, so
``--help`` is fast."""

from __future__ import annotations

import argparse

from dreamcache.cli_args import add_config_arguments, config_from_namespace

from ..kernel.ray_runtime import add_ray_address_argument
from .config import EvaluationConfig


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvaluationConfig)
    add_ray_address_argument(p)


def evaluation_from_args(args: argparse.Namespace) -> EvaluationConfig:
    config = config_from_namespace(EvaluationConfig, args)
    config.validate()
    return config
