"""The caching job's command line (``jobs/cache_catalog.py``, ``dreamcache cache-catalog``): light, no Ray or torch.
Its options are the fields of CachingJobConfig (dreamcache.cli_args)."""

from __future__ import annotations

import argparse

from dreamcache.cli_args import add_config_arguments, config_from_namespace

from .config import CachingJobConfig


def add_caching_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, CachingJobConfig)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def config_from_args(args: argparse.Namespace) -> CachingJobConfig:
    return config_from_namespace(CachingJobConfig, args)
