"""The caching job's command line (``jobs/cache_catalog.py``, ``dreamcache cache-catalog``): light, no Ray or torch."""

from __future__ import annotations

import argparse
import json

from .config import CachingJobConfig


def add_caching_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="prefix laid out PREFIX/<subject_id>/<image files> (path or s3://)")
    source.add_argument("--catalog", help="Parquet, CSV or JSONL file with subject_id, image_uri columns "
                                          "(and optionally image_version, e.g. ETags from an inventory)")
    p.add_argument("--out", required=True, help="prefix for <subject_id>.safetensors and _manifests/caching/")
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder (path or s3://)")
    p.add_argument("--actors", type=int, default=CachingJobConfig.actors, help="size of the caching actor pool")
    p.add_argument("--gpus-per-actor", type=float, default=CachingJobConfig.gpus_per_actor, help="0 = CPU actors")
    p.add_argument("--cpus-per-actor", type=float, default=CachingJobConfig.cpus_per_actor)
    p.add_argument("--batch-size", type=int, default=CachingJobConfig.batch_size,
                   help="subjects per actor batch (and images per UNet call)")
    p.add_argument("--actor-concurrency", type=int, default=CachingJobConfig.actor_concurrency,
                   help="batches in flight per actor: input prep and serialization overlap the GPU work")
    p.add_argument("--resolution", type=int, help="reference size in pixels (default: the model's)")
    p.add_argument("--preprocess", choices=["resize", "pad"], default=CachingJobConfig.preprocess)
    p.add_argument("--cache-prompt", default=CachingJobConfig.cache_prompt)
    p.add_argument("--seed", type=int, default=CachingJobConfig.seed)
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default=CachingJobConfig.dtype)
    p.add_argument("--max-image-pixels", type=int, default=CachingJobConfig.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=CachingJobConfig.max_image_bytes)
    p.add_argument("--max-references", type=int, default=CachingJobConfig.max_references)
    p.add_argument("--listing-shards", type=int, help="parallel listing tasks (default: 16 on S3, 4 locally)")
    p.add_argument("--actor-resources", type=json.loads, metavar="JSON",
                   help='custom Ray resources per caching actor, e.g. \'{"caching_node": 1}\'')
    p.add_argument("--wait-for-resources", action="store_true",
                   help="wait for nodes that offer the actors' resources (an autoscaling cluster) instead of "
                        "failing at once when no node has them")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def config_from_args(args: argparse.Namespace) -> CachingJobConfig:
    return CachingJobConfig(
        out=args.out, model=args.model, images=args.images, catalog=args.catalog, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        actor_concurrency=args.actor_concurrency, resolution=args.resolution, preprocess=args.preprocess,
        cache_prompt=args.cache_prompt, seed=args.seed, dtype=args.dtype, max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes, max_references=args.max_references,
        listing_shards=args.listing_shards, actor_resources=args.actor_resources,
        wait_for_resources=args.wait_for_resources,
    )
