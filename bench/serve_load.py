"""Load test of the Serve app: N concurrent clients for M seconds against a local Serve app on 127.0.0.1.

Prints requests/s, images/s, p50/p95 latency and the count of every non-200 status, and the served images/s as
a ratio to offline batched generation of the same model, batch size, steps and resolution, measured in the same
run before Serve starts (target: >= 0.85 under sustained load). Only 503s (overload, with Retry-After) are
allowed errors: any other status makes the exit code 1.

    python bench/serve_load.py                                  # tiny model on CPU, 16 clients, 30 s
    python bench/serve_load.py --clients 64 --duration 60 --model sd21-random --device cuda --dtype fp16 \\
        --steps 50 --batch-size 8 --replicas 1 --gpus-per-replica 1

Every request asks for one image (the hardest case for batching: a batch needs batch-size requests) of one of
``--subjects`` subjects, so the served batches mix subjects as the offline baseline's batches do.

``--workload grid``: each client sends POST /v1/grids of ``--grid-subjects`` subjects x ``--grid-prompts``
prompts x one seed, in turn over all subjects, and reads the NDJSON stream; reported: cells/s, each cell's
latency from its grid's start (p50/p95), the share of cells per replica and the cache hit ratio (from the
cells' ``replica`` and ``cache`` fields), against the same offline baseline:

    python bench/serve_load.py --workload grid --replicas 2 --subjects 32 --clients 4 --cpus-per-replica 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

PROMPTS = ["a photo of the subject on a beach", "the subject in the snow", "the subject on a wooden table",
           "a watercolor painting of the subject"]


def write_model(kind: str, out: Path) -> Path:
    """A model folder with adapters: 'tiny' (the project's test model) or 'sd21-random' (the real SD 2.1-base
    architecture with random weights: what the GPU pays for does not depend on the values)."""
    from dreamcache.models import write_tiny_model

    if kind == "tiny":
        return write_tiny_model(out)
    import torch

    from method import write_sd21_random

    # Random init on the GPU when there is one: seconds there, minutes on a small CPU.
    return write_sd21_random(out, torch.float16, "cuda" if torch.cuda.is_available() else "cpu")


def reference_images(count: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- offline baseline -----------------------------------------------------------------------------------------
def offline_images_per_s(args, model: str, adapter: str, references) -> float:
    """Back-to-back batches of ``batch_size`` images mixing the subjects, one cache per image, as served."""
    import torch

    from dreamcache.cli import pick_device, pick_dtype
    from dreamcache.pipeline import DreamCachePipeline

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = pick_device(args.device)
    pipe = DreamCachePipeline.from_pretrained(model, adapter=adapter, torch_dtype=pick_dtype(args.dtype, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    caches = [pipe.cache_subject([image], subject_id=f"s{i}") for i, image in enumerate(references)]
    batch = args.offline_batch_size
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    rows = [caches[i % len(caches)] for i in range(batch)]

    def one_batch(seed: int) -> None:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        pipe(prompts, rows, num_inference_steps=args.steps, generator=generators, guidance=args.guidance)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_batch(0)  # warm-up
    images, started, seed = 0, time.perf_counter(), 1
    while time.perf_counter() - started < args.offline_seconds or images < 2 * batch:
        one_batch(seed)
        images += batch
        seed += batch
    return images / (time.perf_counter() - started)


def offline_then_free(args, model: str, adapter: str, references) -> float:
    """The baseline, then its device memory handed back: the Serve replica needs it next."""
    import gc

    import torch

    rate = offline_images_per_s(args, model, adapter, references)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rate


# -- load -----------------------------------------------------------------------------------------------------
async def run_clients(url: str, args, subjects: list[str]) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    retry_after_missing = 0
    images = 0
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal images, retry_after_missing
        n = 0
        while time.monotonic() < deadline:
            body = {"subject_id": subjects[(index + n) % len(subjects)], "prompt": PROMPTS[n % len(PROMPTS)],
                    "steps": args.steps, "num_images": 1, "seed": index * 100_000 + n, "guidance": args.guidance}
            n += 1
            started = time.monotonic()
            try:
                response = await http.post("/v1/generate", json=body)
            except httpx.HTTPError as exc:
                statuses[f"transport:{type(exc).__name__}"] += 1
                continue
            if time.monotonic() > deadline:  # finished after the window: not part of the measured rate
                break
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - started)
                images += len(response.json()["images"])
            elif response.status_code == 503:
                retry_after_missing += "retry-after" not in response.headers
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 0.5))

    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout + 30, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        elapsed = min(time.monotonic(), deadline) - started
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: float("nan"))
    return {
        "seconds": elapsed, "ok": statuses.get(200, 0), "images": images,
        "requests_per_s": statuses.get(200, 0) / elapsed, "images_per_s": images / elapsed,
        "p50_s": pick(0.50), "p95_s": pick(0.95), "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "503_without_retry_after": retry_after_missing,
    }


async def run_grid_clients(url: str, args, subjects: list[str]) -> dict:
    """Closed-loop clients each sending one grid after the other (see the module docstring)."""
    import httpx

    cell_latencies: list[float] = []
    statuses: Counter = Counter()  # of the grid requests
    cell_errors: Counter = Counter()
    replicas: Counter = Counter()
    caches: Counter = Counter()
    deadline = time.monotonic() + args.duration
    prompts = [{"prompt": p} for p in (PROMPTS * args.grid_prompts)[: args.grid_prompts]]

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < deadline:
            first = (index + n * args.clients) * args.grid_subjects
            chosen = [subjects[(first + k) % len(subjects)] for k in range(args.grid_subjects)]
            body = {"subject_ids": chosen, "prompts": prompts, "seeds": [index * 100_000 + n], "steps": args.steps,
                    "guidance": args.guidance}
            n += 1
            started = time.monotonic()
            try:
                async with http.stream("POST", "/v1/grids", json=body) as response:
                    statuses[response.status_code] += 1
                    if response.status_code != 200:
                        await response.aread()
                        await asyncio.sleep(0.5)
                        continue
                    async for line in response.aiter_lines():
                        if not line:
                            continue
                        if time.monotonic() > deadline:  # after the window: not part of the measured rate
                            return
                        cell = json.loads(line)
                        if "png" in cell:
                            cell_latencies.append(time.monotonic() - started)
                            replicas[cell["replica"]] += 1
                            caches[cell["cache"]] += 1
                        else:
                            cell_errors[cell["error"]["status"]] += 1
            except httpx.HTTPError as exc:
                statuses[f"transport:{type(exc).__name__}"] += 1

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout + 30, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        elapsed = min(time.monotonic(), deadline) - started
    cell_latencies.sort()
    pick = (lambda q: cell_latencies[min(len(cell_latencies) - 1, int(q * len(cell_latencies)))]) \
        if cell_latencies else (lambda q: float("nan"))
    cells = len(cell_latencies)
    return {
        "seconds": elapsed, "ok": cells, "images": cells, "requests_per_s": statuses.get(200, 0) / elapsed,
        "images_per_s": cells / elapsed, "p50_s": pick(0.50), "p95_s": pick(0.95),
        "mean_s": statistics.fmean(cell_latencies) if cell_latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "cell_errors": {str(k): v for k, v in sorted(cell_errors.items())},
        "replica_share": {r: v / max(cells, 1) for r, v in sorted(replicas.items())},
        "cache_hit_ratio": caches.get("hit", 0) / max(cells, 1),
        "503_without_retry_after": 0,
    }


def serve_and_load(args, model: str, adapter: str, references, caches: str) -> tuple[dict, dict]:
    import httpx
    from ray import serve

    from pipelines.kernel.ray_runtime import init_ray
    from pipelines.serve import build_app

    init_ray(address=args.ray_address)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app_args = {
        "model": model, "adapter": adapter, "caches": caches, "device": args.device, "dtype": args.dtype,
        "replicas": args.replicas, "max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait,
        "max_ongoing_requests": args.max_ongoing or 2 * args.batch_size, "max_queued_requests": args.max_queued,
        "request_timeout_s": args.request_timeout, "cpus_per_replica": args.cpus_per_replica, "ingress_cpus": 0.5,
        "max_caches_per_replica": args.caches_per_replica or max(len(references), 2),
    }
    if args.gpus_per_replica is not None:
        app_args["gpus_per_replica"] = args.gpus_per_replica
    if args.torch_threads:
        app_args["torch_threads"] = args.torch_threads
    url = f"http://127.0.0.1:{args.port}"
    try:
        serve.run(build_app(app_args), name="dreamcache-bench", route_prefix="/")
        subjects = [f"bench-{i}" for i in range(len(references))]
        with httpx.Client(base_url=url, timeout=600) as http:
            for subject, image in zip(subjects, references):
                response = http.post("/v1/subjects", data={"subject_id": subject},
                                     files=[("images", ("ref.png", png_bytes(image), "image/png"))])
                response.raise_for_status()
            for subject in subjects:  # warm-up: every subject resident, first calls paid
                http.post("/v1/generate", json={"subject_id": subject, "prompt": "x", "steps": args.steps}).raise_for_status()
        generator = serve.get_deployment_handle("Generator", "dreamcache-bench")

        def replica_stats() -> dict[str, dict]:  # every replica's counters (a broadcast reaches them all)
            return {s["replica"]: s for s in generator.broadcast("stats").results(timeout_s=60)}

        before = replica_stats()
        load = run_grid_clients if args.workload == "grid" else run_clients
        result = asyncio.run(load(url, args, subjects))
        after = replica_stats()
        # Replica-side figures of the load window only, summed over the replicas.
        stats = {k: sum(a[k] - before.get(r, {}).get(k, 0) for r, a in after.items())
                 for k in ("batches", "images", "busy_s", "loads")}
        stats["replicas"] = len(after)
        stats["max_batch_subjects"] = max(a["max_batch_subjects"] for a in after.values())
        return result, stats
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'sd21-random', or a diffusers folder/URI")
    parser.add_argument("--adapter", help="adapter file (default: the generated model's)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="images per UNet batch (served and offline)")
    parser.add_argument("--batch-wait", type=float, default=0.02, help="serve batch wait timeout, s")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--guidance", choices=["compositional", "joint"], default="compositional")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--gpus-per-replica", type=float)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-ongoing", type=int, help="per replica (default: 2x the batch size)")
    parser.add_argument("--max-queued", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--torch-threads", type=int, help="CPU: intra-op threads, served and offline alike "
                                                          "(default on CPU: 1, what a 1-CPU replica gets)")
    parser.add_argument("--offline-seconds", type=float, default=10.0, help="duration of the offline baseline")
    parser.add_argument("--offline-batch-size", type=int, help="the baseline's batch (default: --batch-size); 1 "
                        "with --clients 1 compares one client's latency with the pipeline's batch-1 latency")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ray-address", help="default: a local Ray")
    parser.add_argument("--target", type=float, default=0.85, help="served/offline images/s to report against")
    parser.add_argument("--json-out", help="also write the figures as JSON here")
    parser.add_argument("--workload", choices=["generate", "grid"], default="generate")
    parser.add_argument("--grid-subjects", type=int, default=4, help="grid workload: subjects per grid")
    parser.add_argument("--grid-prompts", type=int, default=2, help="grid workload: prompts per grid")
    parser.add_argument("--caches-per-replica", type=int, help="LRU slots per replica (default: every subject)")
    args = parser.parse_args(argv)
    args.offline_batch_size = args.offline_batch_size or args.batch_size

    import torch

    from dreamcache.cli import pick_device, quiet_libraries

    quiet_libraries()
    if pick_device(args.device).type == "cpu" and not args.torch_threads:
        args.torch_threads = 1
    work = Path(tempfile.mkdtemp(prefix="dreamcache-serve-bench-"))
    if args.model in ("tiny", "sd21-random"):
        model = str(write_model(args.model, work / "model"))
        adapter = args.adapter or str(Path(model) / "adapter.safetensors")
    else:
        model, adapter = args.model, args.adapter
    references = reference_images(args.subjects, 256)  # resized to the model's resolution when cached

    device = pick_device(args.device)
    print(f"model {args.model}, {args.steps} steps, {args.guidance} guidance, batch {args.batch_size}, "
          f"{args.subjects} subjects; {device}{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{os.cpu_count()} CPU cores, torch threads {args.torch_threads or torch.get_num_threads()}", flush=True)
    # The baseline runs before and after the load (the device is free then): a drift between the two shows a
    # machine whose speed changed under the run (shared CPUs), and the ratio uses their mean.
    before = offline_then_free(args, model, adapter, references)
    print(f"offline batched generation (before): {before:.3f} images/s", flush=True)
    served, stats = serve_and_load(args, model, adapter, references, str(work / "caches"))
    after = offline_then_free(args, model, adapter, references)
    offline = (before + after) / 2
    print(f"offline batched generation (after):  {after:.3f} images/s   (drift {after / before - 1:+.0%})")
    ratio = served["images_per_s"] / offline
    errors = {k: v for k, v in served["statuses"].items() if k not in ("200", "503")}
    print(f"served ({args.workload}) with {args.clients} clients for {served['seconds']:.1f} s:")
    if args.workload == "grid":
        print(f"  grids of {args.grid_subjects} subjects x {args.grid_prompts} prompts: cells/s "
              f"{served['images_per_s']:.3f}, cell latency p50 {served['p50_s']:.3f} s p95 {served['p95_s']:.3f} s, "
              f"cache hit ratio {served['cache_hit_ratio']:.3f}, replica share "
              f"{[round(v, 3) for v in served['replica_share'].values()]}, cell errors {served['cell_errors']}")
    print(f"  requests/s {served['requests_per_s']:.3f}   images/s {served['images_per_s']:.3f}   "
          f"p50 {served['p50_s']:.3f} s   p95 {served['p95_s']:.3f} s")
    print(f"  statuses {served['statuses']}   503 without Retry-After: {served['503_without_retry_after']}")
    print(f"  replicas: {stats['loads']} cache loads, {stats['batches']} batches, {stats['images'] / max(stats['batches'], 1):.2f} images/batch, "
          f"max {stats['max_batch_subjects']} subjects in a batch, busy {stats['busy_s'] / (served['seconds'] * stats['replicas']):.0%} "
          f"of the window, {stats['images'] / max(stats['busy_s'], 1e-9):.3f} images per busy second")
    # At one client every request is a batch of one: its p50 against one offline batch's time.
    batch_s = args.offline_batch_size / offline
    print(f"offline batch of {args.offline_batch_size}: {batch_s:.3f} s;  served p50 / offline batch time: "
          f"{served['p50_s'] / batch_s:.3f}")
    print(f"served / offline images/s: {ratio:.3f}  (target >= {args.target}: {'met' if ratio >= args.target else 'NOT met'})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"offline_images_per_s": {"before": before, "after": after},
                                                   "served": served, "ratio": ratio,
                                                   "replica": stats, "args": vars(args)}, indent=2))
    if errors or served["503_without_retry_after"]:
        print(f"FAILED: errors other than 503: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
