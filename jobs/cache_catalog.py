"""Compute every subject's feature cache from reference images in object storage (a Ray Data job).

    ray job submit --working-dir . -- python jobs/cache_catalog.py --images s3://bucket/refs --out s3://bucket/caches \\
        --model s3://bucket/models/sd21base --actors 4 --gpus-per-actor 1 --batch-size 32

Run directly (``python jobs/cache_catalog.py ...``) without RAY_ADDRESS, it starts a local Ray. Ends with a
summary line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from the root

from dreamcache.cli_args import ArgumentParser  # noqa: E402
from pipelines.caching.args import add_caching_arguments, config_from_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a typo in a manifest's args (--seed for --seeds) must fail, not match a prefix.
    p = ArgumentParser(prog="cache_catalog.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_caching_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.kernel.ray_runtime import init_ray, run_entrypoint

    def work() -> list[str]:
        from pipelines.caching import run_caching

        config = config_from_args(args)
        init_ray(args.ray_address)
        return [run_caching(config).line()]

    return run_entrypoint("cache_catalog", work)


if __name__ == "__main__":
    sys.exit(main())
