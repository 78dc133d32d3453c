"""The caching job's command line (``jobs/cache_catalog.py``, ``dreamcache cache-catalog``): light, no Ray or torch.
Its options are the fields of CachingJobConfig (dreamcache.cli_args)."""

from __future__ import annotations

import argparse

from dreamcache.cli_args import add_config_arguments, config_from_namespace

from ..kernel.ray_runtime import add_ray_address_argument
from .config import CachingJobConfig


def add_caching_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, CachingJobConfig)
    add_ray_address_argument(p)


def config_from_args(args: argparse.Namespace) -> CachingJobConfig:
    return config_from_namespace(CachingJobConfig, args)
