"""Batch generation job throughput vs the bare batched loop: same model, rows, steps and batch size, one run.

    python bench/generation_job.py                                        # tiny model on CPU
    python bench/generation_job.py --model sd21-random --device cuda --batch 8 --steps 20 --images 96

  bare loop   DreamCachePipeline called on the plan's rows in batches of --batch (one cache and one generator per
              image), each image PNG-encoded and written to a local folder: the job's work per image, minus Ray.
  job         run_generation() on a local Ray, one actor (one GPU on CUDA), over the same rows.

images/s are reported for the bare loop (after a warm-up batch), the job in steady state (from the end of its
first batch to the end of its last, from the manifest's timestamps: actor start-up, model load and the first,
warm-up batch excluded) and the job end to end (the whole run_generation() call). The target on GPU: steady
state >= 0.9 x the bare loop. ``sd21-random`` is the SD 2.1-base architecture with random weights (the cost
does not depend on the values), written to a temporary folder first so that the job's actor loads it as a real
run would.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dreamcache.cache_store import CacheStore  # noqa: E402
from dreamcache.models import write_tiny_model  # noqa: E402
from dreamcache.pipeline import DreamCachePipeline  # noqa: E402
from pipelines.generation import GenerationJobConfig, build_plan, read_manifest, run_generation  # noqa: E402
from method import write_sd21_random  # noqa: E402 - bench/method.py
from timing import sync  # noqa: E402 - bench/timing.py

PROMPTS = ["a photo of a toy on the beach", "a photo of a toy in the snow", "a toy on a wooden table",
           "a toy in the jungle"]
COLOURS = ["red", "blue", "green", "orange", "purple", "teal", "gray", "yellow"]


def bare_loop(pipe, rows, caches, args, out: Path) -> tuple[float, int]:
    """Seconds for every batch after the first (warm-up), and how many images they made."""
    out.mkdir(parents=True, exist_ok=True)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    timed_images, start = 0, None
    for number, batch in enumerate(batches):
        if number == 1:
            sync(args.device)
            start = time.perf_counter()
        images = pipe([r.prompt.prompt for r in batch], [caches[r.subject_id] for r in batch],
                      num_inference_steps=args.steps, guidance_scale=batch[0].prompt.guidance_scale,
                      image_guidance_scale=batch[0].prompt.image_guidance_scale,
                      generator=[torch.Generator().manual_seed(r.seed) for r in batch]).images
        for r, image in zip(batch, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            (out / f"{r.row_key[:16]}.png").write_bytes(buffer.getvalue())
        timed_images += len(batch) if number >= 1 else 0
    sync(args.device)
    return time.perf_counter() - start, timed_images


def steady_state(manifest: list[dict]) -> tuple[float, int]:
    """(seconds, images) from the end of the job's first batch to the end of its last."""
    batches: dict[float, list[dict]] = {}
    for row in manifest:
        if row["action"] == "rendered":
            batches.setdefault(row["started_at"], []).append(row)
    ends = sorted((max(r["finished_at"] for r in rows), len(rows)) for rows in batches.values())
    if len(ends) < 2:
        raise SystemExit("the job rendered fewer than two batches: raise --images")
    return ends[-1][0] - ends[0][0], sum(n for _, n in ends[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21-random"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=32, help="rows to render (subjects x prompts x seeds)")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU: torch threads of the bare loop and of the job's actor alike")
    parser.add_argument("--ray-cpus", type=float, help="logical CPUs of the local Ray (default: Ray's count)")
    parser.add_argument("--work-dir", help="keep the model, caches and outputs here (default: a temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    torch.set_num_threads(args.threads)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-generation-"))
    model_dir = write_tiny_model(work / "model") if args.model == "tiny" else write_sd21_random(work / "model", dtype, args.device)
    adapter = str(model_dir / "adapter.safetensors")
    pipe = DreamCachePipeline.from_pretrained(str(model_dir), adapter=adapter, torch_dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)

    from PIL import Image

    subjects = [f"{COLOURS[i % len(COLOURS)]}-{i}" for i in range(args.subjects)]
    size = pipe.default_resolution
    built = pipe.build_caches([Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)]) for i in range(args.subjects)])
    store = CacheStore(str(work / "caches"))
    for subject, cache in zip(subjects, built):
        store.write(subject, cache)
    caches = {s: pipe.load_cache(store.uri_for(s)) for s in subjects}

    seeds = list(range(math.ceil(args.images / (len(subjects) * len(PROMPTS)))))
    config = GenerationJobConfig(
        model=str(model_dir), adapter=adapter, caches=str(work / "caches"), prompts=PROMPTS, subjects=subjects,
        seeds=seeds, out=str(work / "job-out"), steps=args.steps, batch_size=args.batch, actors=1,
        gpus_per_actor=1.0 if cuda else 0.0, cpus_per_actor=1.0, device=args.device,
        dtype="fp16" if cuda else "fp32", torch_threads=None if cuda else args.threads, contact_sheet="none",
    )
    rows = build_plan(config)[: args.images]
    config.plan = [{"subject_id": r.subject_id, "prompt": r.prompt.prompt, "seed": r.seed} for r in rows]
    config.prompts = None

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else f'CPU, {args.threads} threads'}; "
          f"{args.model} at {size}px, {len(rows)} images, batch {args.batch}, {args.steps} steps, compositional")
    with torch.inference_mode():
        bare_s, bare_n = bare_loop(pipe, rows, caches, args, work / "bare-out")
    bare_rate = bare_n / bare_s
    del pipe, caches
    if cuda:
        torch.cuda.empty_cache()

    from pipelines.kernel.ray_runtime import init_ray

    # Ray starts its workers at niceness 15: on a shared CPU machine the actor would lose to every other
    # process while the bare loop runs at 0. Same priority for both (irrelevant on a GPU node).
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(num_cpus=args.ray_cpus)
    start = time.perf_counter()
    summary = run_generation(config)
    wall = time.perf_counter() - start
    if summary.rendered != len(rows):
        raise SystemExit(f"the job rendered {summary.rendered} of {len(rows)} rows: {summary}")
    job_s, job_n = steady_state(read_manifest(summary.manifest_uri))
    job_rate = job_n / job_s

    print(f"  bare batched loop (baseline)      {bare_rate:8.3f} images/s   1.000x")
    print(f"  Ray Data job, steady state        {job_rate:8.3f} images/s   {job_rate / bare_rate:.3f}x")
    print(f"  Ray Data job, end to end          {len(rows) / wall:8.3f} images/s   {len(rows) / wall / bare_rate:.3f}x"
          f"   ({wall:.1f} s: Ray Data start, actor start, model load included)")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
