"""Caching job throughput: the Ray Data job against the bare in-process loop, same machine, model, batch size.

Both do the same work per subject: read the reference bytes from the store, decode and resize, VAE-encode +
UNet at t=1 (DreamCachePipeline.build_caches, batch B), write the cache file. Prints subjects/s and the ratio.

    python bench/caching_job.py                                   # tiny model, local folders, CPU
    python bench/caching_job.py --model sd21-random --subjects 512 --batch-size 32 --actors 1 --gpus-per-actor 1 --s3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the SeaweedFS launcher for --s3


def make_model(kind: str, folder: Path, device: str) -> str:
    import torch

    from dreamcache.models import write_tiny_model

    if kind == "tiny":
        return str(write_tiny_model(folder))
    from method import write_sd21_random

    return str(write_sd21_random(folder, torch.float16 if device == "cuda" else torch.float32, device))


def make_references(root: str, count: int, size: int) -> None:
    from PIL import Image

    from dreamcache import storage

    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (i * 37 % 255, (i * 91) % 255, 120)).save(buffer, format="PNG")
        storage.write_bytes(storage.join_uri(root, f"s{i:05d}", "ref.png"), buffer.getvalue())


def bare_loop(refs: str, out: str, model: str, batch: int, device: str) -> float:
    """The method in one process: no Ray. Returns seconds (model load excluded, as the job's actors load once)."""
    import torch

    from dreamcache import storage
    from dreamcache.cache_store import CacheStore
    from dreamcache.images import decode_image, sha256_hex
    from dreamcache.pipeline import DreamCachePipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = DreamCachePipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    store = CacheStore(out)
    uris = storage.list_files(refs)
    start = time.perf_counter()
    for first in range(0, len(uris), batch):
        chunk = uris[first : first + batch]
        blobs = [storage.read_bytes(u) for u in chunk]
        caches = pipe.build_caches([decode_image(b, u) for b, u in zip(blobs, chunk)], [sha256_hex(b) for b in blobs],
                                   batch_size=batch)
        for uri, cache in zip(chunk, caches):
            store.write(uri.rstrip("/").split("/")[-2], cache)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report_job(summary, concurrency: int, bare_s: float, subjects: int) -> None:
    """The job's rates against the bare loop, and where its time went (manifest timings, summed per stage)."""
    import pyarrow.parquet as pq

    from dreamcache import storage

    print(f"  Ray Data job, {concurrency} call(s)/actor, whole run {subjects / summary.seconds:8.2f} subjects/s   "
          f"{bare_s / summary.seconds:.3f}x   ({summary.first_result_s:.1f} s to the first batch: Ray start-up of the "
          f"actor pool and model load)")
    if summary.after_first and summary.seconds > summary.first_result_s:
        steady = summary.after_first / (summary.seconds - summary.first_result_s)
        print(f"  Ray Data job, {concurrency} call(s)/actor, after 1st batch {steady:8.2f} subjects/s   "
              f"{steady * bare_s / subjects:.3f}x")
    files = json.loads(storage.read_bytes(summary.manifest_uri))["files"]
    rows = [r for f in files for r in pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist()]
    stages = {stage: sum(row[f"{stage}_s"] or 0.0 for row in rows) for stage in ("read", "compute", "write")}
    print("    summed over subjects: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
          + f"; job wall {summary.seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "sd21-random"], default="tiny")
    p.add_argument("--subjects", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--actor-concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[2],
                   help="batches in flight per actor, comma-separated to compare (1: no overlap)")
    p.add_argument("--s3", action="store_true", help="read and write through a local SeaweedFS S3 server")
    args = p.parse_args(argv)

    import torch

    from pipelines.caching import CachingJobConfig, run_caching
    from pipelines.kernel.ray_runtime import init_ray

    device = "cuda" if args.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="dc-bench-"))
    server = None
    if args.s3:
        from s3_server import SeaweedS3

        server = SeaweedS3().__enter__()
        os.environ.update(server.env())
        root = f"s3://{server.bucket}/bench"
    else:
        root = str(work / "store")
    try:
        model = make_model(args.model, work / "model", device)
        size = 64 if args.model == "tiny" else 512
        refs = f"{root}/refs"
        make_references(refs, args.subjects, size)
        bare_s = bare_loop(refs, f"{root}/bare", model, args.batch_size, device)
        init_ray()
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"caching job   {args.subjects} subjects, batch {args.batch_size}, {args.model}, {name}, "
              f"{'S3 (SeaweedFS)' if args.s3 else 'local folder'}")
        print(f"  bare in-process loop (baseline) {args.subjects / bare_s:8.2f} subjects/s   1.000x")
        for concurrency in args.actor_concurrency:
            summary = run_caching(CachingJobConfig(
                out=f"{root}/job-{concurrency}", model=model, images=refs, actors=args.actors,
                gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, actor_concurrency=concurrency))
            report_job(summary, concurrency, bare_s, args.subjects)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
