"""Compute every subject's feature cache from reference images in object storage (a Ray Data job).

    ray job submit --working-dir . -- python jobs/cache_catalog.py --images s3://bucket/refs --out s3://bucket/caches \\
        --model s3://bucket/models/sd21base --actors 4 --gpus-per-actor 1 --batch-size 32

Without a Ray cluster (no RAY_ADDRESS) the same command starts a local Ray. Ends with a summary line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from the root

from pipelines.caching import CachingJobConfig, JobInputError, run_caching  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a typo in a manifest's args (--seed for --seeds) must fail, not match a prefix.
    p = argparse.ArgumentParser(prog="cache_catalog.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="prefix laid out PREFIX/<subject_id>/<image files> (path or s3://)")
    source.add_argument("--catalog", help="Parquet, CSV or JSONL file with subject_id, image_uri columns")
    p.add_argument("--out", required=True, help="prefix for <subject_id>.safetensors and manifest.parquet")
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder (path or s3://)")
    p.add_argument("--actors", type=int, default=1, help="size of the caching actor pool")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="0 = CPU actors")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8, help="subjects per actor batch (and images per UNet call)")
    p.add_argument("--actor-concurrency", type=int, default=CachingJobConfig.actor_concurrency,
                   help="batches in flight per actor: input prep and serialization overlap the GPU work")
    p.add_argument("--resolution", type=int, help="reference size in pixels (default: the model's)")
    p.add_argument("--preprocess", choices=["resize", "pad"], default="resize")
    p.add_argument("--cache-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    p.add_argument("--max-image-pixels", type=int, default=CachingJobConfig.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=CachingJobConfig.max_image_bytes)
    p.add_argument("--max-references", type=int, default=CachingJobConfig.max_references)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    return p


def config_from_args(args: argparse.Namespace) -> CachingJobConfig:
    return CachingJobConfig(
        out=args.out, model=args.model, images=args.images, catalog=args.catalog, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        actor_concurrency=args.actor_concurrency, resolution=args.resolution, preprocess=args.preprocess,
        cache_prompt=args.cache_prompt, seed=args.seed,
        dtype=args.dtype, max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
        max_references=args.max_references,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dreamcache.storage import StorageError
    from pipelines.ray_runtime import init_ray, run_entrypoint

    def work() -> list[str]:
        config = config_from_args(args)
        init_ray(args.ray_address)
        return [run_caching(config).line()]

    return run_entrypoint("cache_catalog", work, (JobInputError, StorageError))


if __name__ == "__main__":
    sys.exit(main())
