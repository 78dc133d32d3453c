"""Load test of the Serve app: N concurrent clients for M seconds against a local Serve app on 127.0.0.1.

Prints requests/s, images/s, p50/p95 latency and the count of every non-200 status, and the served images/s as
a ratio to offline batched generation in the same run (target: >= 0.9). Only 503s (overload, with Retry-After)
are allowed errors: any other status makes the exit code 1.

    python bench/serve_load.py                                  # tiny model on CPU, 16 clients, 20 steps
    python bench/serve_load.py --clients 64 --duration 60 --model sd21-random --device cuda --dtype fp16 \\
        --steps 50 --batch-size 8 --replicas 1 --gpus-per-replica 1

**The measured window** (``--duration``) follows ``--warmup`` seconds of the same load: the load starts with
empty queues, and without the warm-up the first batch time of every run (seconds on a CPU) counted as idle.

**The offline baseline** is what the generator replicas could do with no Serve around them: one Ray actor per
replica, with a replica's resources (CPUs, GPUs), loaded by the replica's own loader from the same app settings
(model, dtype, torch threads), all running back-to-back batches of the served batch size, mixing the subjects,
at the same time, each encoding its images as the served path does (PNG at the replica's zlib level, then
base64), so both sides do the same work; its images/s is their sum. It is measured before the first served run
and after every one,
in the same process and Ray: each run's ratio uses the mean of the baselines just before and just after it, and
both are printed, so a machine whose speed changed under the run shows as a drift between the two.

**Where the CPU goes** (``CpuMeter``): each window's CPU seconds of every process of the local Ray by role
(generator replicas, ingress, proxy, controller, raylet, ...), of the bench's own clients, and of the rest of the
machine. On a shared machine the neighbours' load moves the images/s of both sides from one window to the next
(the drift above), so the run also prints the ratio of images per CPU second of our Ray, served / offline:
what serving costs on top of the generation, whatever the neighbours took; and the same for the generator
replicas alone against the offline workers (batch fill, the replica's own overheads).

Every request asks for one image (the hardest case for batching: a batch needs batch-size requests) of one of
``--subjects`` subjects, so the served batches mix subjects as the offline baseline's batches do.

``--workload grid``: each client sends POST /v1/grids of ``--grid-subjects`` subjects x ``--grid-prompts``
prompts x one seed, in turn over all subjects, and reads the NDJSON stream; reported: cells/s, each cell's
latency from its grid's start (p50/p95), the share of cells per replica and the cache hit ratio (from the
cells' ``replica`` and ``cache`` fields), against the same offline baseline.

``--routing multiplexed,subject_affinity --repeats 2``: the app's routings (``pipelines/serve/routing.py``), run
one after the other in turn (A B A B), a fresh app and cache store each, with a baseline between runs; the last
lines compare the routings (means over their runs):

    python bench/serve_load.py --workload grid --replicas 2 --subjects 32 --clients 4 --cpus-per-replica 0.5 \\
        --routing multiplexed,subject_affinity --repeats 2
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


# -- where the CPU goes -----------------------------------------------------------------------------------------
def _label(process) -> str:
    """A process of this bench's local Ray by role: Ray's worker title (``ray::ServeReplica:APP:Generator``,
    ``ray::ProxyActor``, ...; without the ``.method`` Ray appends while one runs), else the program or script name
    (raylet, gcs_server, dashboard agent, ...)."""
    import psutil

    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return "?"
    title = cmdline[0] if cmdline else process.name()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    scripts = [Path(part).name for part in cmdline[1:] if part.endswith(".py")]
    return scripts[0] if scripts else Path(title).name


BENCH_ROLE = "bench (driver, clients)"


class CpuMeter:
    """CPU seconds (user + system) used during a window by this process (the bench's clients and Ray driver) and
    every process under it (the local Ray it started: replicas, ingress, proxy, controller, raylet, ...), by role,
    and by the whole machine: on a shared box "other" is everyone else's load, in the same window. "ours" is the
    local Ray without this process: the load generator is no part of what is served (clients run elsewhere)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._start = self._sample()
        self._started = time.monotonic()

    def _sample(self) -> tuple[dict[int, tuple[str, float]], float]:
        psutil = self._psutil
        me = psutil.Process()
        ours: dict[int, tuple[str, float]] = {}
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            label = BENCH_ROLE if process.pid == me.pid else _label(process)
            ours[process.pid] = (label, times.user + times.system)
        machine = psutil.cpu_times()
        return ours, machine.user + machine.nice + machine.system + machine.irq + machine.softirq

    def stop(self) -> dict:
        """{"seconds", "cores", "by_role": {role: CPU s}, "ours", "machine"} over the window."""
        (before, machine_before), (after, machine_after) = self._start, self._sample()
        by_role: Counter = Counter()
        for pid, (label, cpu) in after.items():
            # A process that started in the window counts from zero; one that ended in it is lost (rare: idle workers).
            by_role[label] += cpu - before.get(pid, (label, 0.0))[1]
        ours = sum(v for role, v in by_role.items() if role != BENCH_ROLE)
        return {"seconds": time.monotonic() - self._started, "cores": os.cpu_count(),
                "by_role": {k: round(v, 2) for k, v in by_role.most_common()}, "ours": round(ours, 2),
                "bench": round(by_role[BENCH_ROLE], 2), "machine": round(machine_after - machine_before, 2)}


def cpu_line(cpu: dict) -> str:
    """One line: each role's share of the machine's CPU capacity over the window, ours and everyone else's."""
    capacity = cpu["seconds"] * cpu["cores"]
    roles = ", ".join(f"{role.removeprefix('ray::')} {v / capacity:.0%}" for role, v in cpu["by_role"].items()
                      if v / capacity >= 0.005)
    others = max(cpu["machine"] - cpu["ours"] - cpu["bench"], 0)
    return (f"CPU of {cpu['cores']} cores over {cpu['seconds']:.0f} s: our Ray {cpu['ours'] / capacity:.0%}, the bench "
            f"{cpu['bench'] / capacity:.0%} ({roles}); other processes on the machine {others / capacity:.0%}")


# -- offline baseline -----------------------------------------------------------------------------------------
class OfflineWorker:
    """One replica's worth of offline generation (a Ray actor with a replica's resources): the pipeline loaded as
    the generator loads it, then back-to-back batches of ``batch`` images mixing the subjects, one cache each."""

    def __init__(self, app_args: dict, reference_pngs: list[bytes], batch: int, steps: int, guidance: str) -> None:
        import io

        import torch
        from PIL import Image

        from pipelines.generation.render import load_render_pipeline
        from pipelines.serve.settings import ServeSettings

        self.torch = torch
        self.pipe = load_render_pipeline(ServeSettings.model_validate(app_args))  # the Generator's loader and settings
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        caches = [self.pipe.cache_subject([Image.open(io.BytesIO(data)).convert("RGB")], subject_id=f"s{i}")
                  .to(device, dtype) for i, data in enumerate(reference_pngs)]
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        self.rows = [caches[i % len(caches)] for i in range(batch)]
        self.batch, self.steps, self.guidance = batch, steps, guidance
        self._one_batch(0)  # warm-up, before the measured window

    def _one_batch(self, seed: int) -> None:
        import base64

        from dreamcache.image_files import png_bytes
        from pipelines.serve.generator import PNG_COMPRESS_LEVEL

        torch = self.torch
        generators = [torch.Generator().manual_seed(seed + i) for i in range(self.batch)]
        images = self.pipe(self.prompts, self.rows, negative_prompt=[""] * self.batch, num_inference_steps=self.steps,
                           generator=generators, guidance=self.guidance).images
        # The served path's work after the pipeline too, so that the ratio compares like with like: a PNG with its
        # parameters at the replica's zlib level, then base64 (the answer's encoding, done by the ingress).
        for i, image in enumerate(images):
            parameters = {"prompt": self.prompts[i], "seed": seed + i, "steps": self.steps, "guidance": self.guidance}
            base64.b64encode(png_bytes(image, parameters, self.pipe.base_model, "cache", PNG_COMPRESS_LEVEL))

    def run(self, start_at: float, seconds: float) -> dict:
        """From the wall-clock time ``start_at`` (every worker starts together), whole batches for at least
        ``seconds``: images, wall seconds and this process's CPU seconds."""
        time.sleep(max(0.0, start_at - time.time()))
        images, started, cpu_started, seed = 0, time.perf_counter(), time.process_time(), 1
        while time.perf_counter() - started < seconds or images < 2 * self.batch:
            self._one_batch(seed)
            images += self.batch
            seed += self.batch
        return {"images": images, "seconds": time.perf_counter() - started,
                "cpu_s": time.process_time() - cpu_started}


def offline_images_per_s(args, app_args: dict, references) -> dict:
    """The baseline (see the module docstring): one OfflineWorker per replica, measured together, summed; the
    workers are gone afterwards, so the served replicas get their devices back. {"images_per_s", "images",
    "cpu": CpuMeter's figures over the window}."""
    import ray

    from pipelines.serve.settings import ServeSettings

    settings = ServeSettings.model_validate(app_args)
    options = settings.generator_options(cluster_has_gpus=ray.cluster_resources().get("GPU", 0) > 0)
    worker = ray.remote(OfflineWorker).options(**options["ray_actor_options"])
    pngs = [png_bytes(image) for image in references]
    workers = [worker.remote(app_args, pngs, args.offline_batch_size, args.steps, args.guidance)
               for _ in range(args.replicas)]
    try:
        ray.get([w.__ray_ready__.remote() for w in workers])  # loaded and warmed up, all of them
        start_at = time.time() + 1.0
        runs = [w.run.remote(start_at, args.offline_seconds) for w in workers]
        time.sleep(max(0.0, start_at - time.time()))
        meter = CpuMeter()
        results = ray.get(runs)
        cpu = meter.stop()
        print(f"  offline {cpu_line(cpu)}", flush=True)
        return {"images_per_s": sum(r["images"] / r["seconds"] for r in results),
                "images": sum(r["images"] for r in results), "cpu": cpu}
    finally:
        for w in workers:
            ray.kill(w)


# -- load -----------------------------------------------------------------------------------------------------
async def run_clients(url: str, args, subjects: list[str], window_start: float) -> dict:
    """Closed-loop clients from now until the measured window (``window_start``, ``args.duration``, monotonic
    clock) ends; only the answers within the window count."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    retry_after_missing = 0
    images = 0
    deadline = window_start + args.duration
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
            counted = time.monotonic() >= window_start  # in the warm-up the queues fill, nothing is counted
            if counted:
                statuses[response.status_code] += 1
            if response.status_code == 200 and counted:
                latencies.append(time.monotonic() - started)
                images += len(response.json()["images"])
            elif response.status_code == 503:
                retry_after_missing += counted and "retry-after" not in response.headers
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 0.5))

    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout + 30, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        elapsed = min(time.monotonic(), deadline) - window_start
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: float("nan"))
    return {
        "seconds": elapsed, "ok": statuses.get(200, 0), "images": images,
        "requests_per_s": statuses.get(200, 0) / elapsed, "images_per_s": images / elapsed,
        "p50_s": pick(0.50), "p95_s": pick(0.95), "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "503_without_retry_after": retry_after_missing,
    }


async def run_grid_clients(url: str, args, subjects: list[str], window_start: float) -> dict:
    """Closed-loop clients each sending one grid after the other (see the module docstring), from now until the
    measured window ends; only the cells answered within the window count."""
    import httpx

    cell_latencies: list[float] = []
    statuses: Counter = Counter()  # of the grid requests
    cell_errors: Counter = Counter()
    replicas: Counter = Counter()
    caches: Counter = Counter()
    deadline = window_start + args.duration
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
                    if time.monotonic() >= window_start:
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
                        if time.monotonic() < window_start:  # the warm-up: the replicas' queues fill
                            continue
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
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        elapsed = min(time.monotonic(), deadline) - window_start
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


def app_args_of(args, model: str, adapter: str, caches: str, routing: str) -> dict:
    """The Serve app's args; the offline baseline is built from the same ones."""
    app_args = {
        "model": model, "adapter": adapter, "caches": caches, "device": args.device, "dtype": args.dtype,
        "replicas": args.replicas, "max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait,
        "max_ongoing_requests": args.max_ongoing or 2 * args.batch_size, "max_queued_requests": args.max_queued,
        "request_timeout_s": args.request_timeout, "cpus_per_replica": args.cpus_per_replica, "ingress_cpus": 0.5,
        "max_caches_per_replica": args.caches_per_replica or max(args.subjects, 2), "routing": routing,
    }
    if args.gpus_per_replica is not None:
        app_args["gpus_per_replica"] = args.gpus_per_replica
    if args.torch_threads:
        app_args["torch_threads"] = args.torch_threads
    return app_args


def serve_and_load(args, app_args: dict, references) -> tuple[dict, dict]:
    """Deploy the app (Serve already started), register and warm up the subjects, run the load; the app is
    deleted afterwards."""
    import httpx
    from ray import serve

    from pipelines.serve import build_app

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

        load = run_grid_clients if args.workload == "grid" else run_clients
        marks: dict = {}

        async def load_and_window() -> dict:
            # The load starts with empty queues: the first answers come one batch time later. The warm-up lets
            # the queues fill; the window's rate is then the steady state (the offline baseline's batches are
            # timed from a warm start too).
            window_start = time.monotonic() + args.warmup

            async def window() -> None:
                await asyncio.sleep(max(0.0, window_start - time.monotonic()))
                meter = CpuMeter()  # first: the stats call can take seconds on a loaded machine
                marks["before"] = await asyncio.to_thread(replica_stats)
                await asyncio.sleep(max(0.0, window_start + args.duration - time.monotonic()))
                marks["cpu"] = meter.stop()
                marks["after"] = await asyncio.to_thread(replica_stats)

            watcher = asyncio.ensure_future(window())
            result = await load(url, args, subjects, window_start)
            await watcher
            return result

        result = asyncio.run(load_and_window())
        before, after = marks["before"], marks["after"]
        result["cpu"] = marks["cpu"]
        # Replica-side figures of the load window only, summed over the replicas.
        stats = {k: sum(a[k] - before.get(r, {}).get(k, 0) for r, a in after.items())
                 for k in ("batches", "images", "busy_s", "encode_s", "loads")}
        stats["replicas"] = len(after)
        stats["max_batch_subjects"] = max(a["max_batch_subjects"] for a in after.values())
        return result, stats
    finally:
        serve.delete("dreamcache-bench")


def _generator_cpu_s(cpu: dict) -> float:
    """CPU seconds of the generator replicas (served) or of the offline workers, from CpuMeter's roles."""
    return sum(v for role, v in cpu["by_role"].items()
               if role.endswith(":Generator") or role.startswith("ray::OfflineWorker"))


def report_run(args, routing: str, served: dict, stats: dict, before: dict, after: dict) -> dict:
    """Print one served run against the baselines before and after it; its ratios to the offline baseline:
    ``images_per_s`` (the issue's figure), and per CPU second (see the module docstring), ``per_cpu_s`` with every
    process of this Ray counted and ``generator_per_cpu_s`` with the replicas' (the workers') alone."""
    offline = (before["images_per_s"] + after["images_per_s"]) / 2
    ratio = served["images_per_s"] / offline
    print(f"== routing {routing}: served ({args.workload}) with {args.clients} clients for {served['seconds']:.1f} s "
          f"after {args.warmup:.0f} s of warm-up")
    if args.workload == "grid":
        print(f"  grids of {args.grid_subjects} subjects x {args.grid_prompts} prompts: cells/s "
              f"{served['images_per_s']:.3f}, cell latency p50 {served['p50_s']:.3f} s p95 {served['p95_s']:.3f} s, "
              f"cache hit ratio {served['cache_hit_ratio']:.3f}, replica share "
              f"{[round(v, 3) for v in served['replica_share'].values()]}, cell errors {served['cell_errors']}")
    print(f"  requests/s {served['requests_per_s']:.3f}   images/s {served['images_per_s']:.3f}   "
          f"p50 {served['p50_s']:.3f} s   p95 {served['p95_s']:.3f} s")
    print(f"  statuses {served['statuses']}   503 without Retry-After: {served['503_without_retry_after']}")
    print(f"  replicas: {stats['loads']} cache loads, {stats['batches']} batches, "
          f"{stats['images'] / max(stats['batches'], 1):.2f} images/batch (offline {args.offline_batch_size}), max "
          f"{stats['max_batch_subjects']} subjects in a batch, busy "
          f"{stats['busy_s'] / (served['seconds'] * stats['replicas']):.0%} of the window, "
          f"{stats['images'] / max(stats['busy_s'], 1e-9):.3f} images per busy second, PNG encoding "
          f"{stats['encode_s'] / max(stats['busy_s'], 1e-9):.1%} of the busy time")
    print(f"  served {cpu_line(served['cpu'])}")
    # At one client every request is a batch of one: its p50 against one offline batch's time.
    batch_s = args.offline_batch_size * args.replicas / offline
    print(f"  offline batched generation: {before['images_per_s']:.3f} images/s before, {after['images_per_s']:.3f} "
          f"after (drift {after['images_per_s'] / before['images_per_s'] - 1:+.0%}), mean {offline:.3f};  served p50 "
          f"/ offline batch time: {served['p50_s'] / batch_s:.3f}")
    # Per CPU second: on a shared machine the neighbours' load changes from one window to the next, and with it
    # the images/s of both sides; images per CPU second of our own processes is what the served path costs.
    offline_images = before["images"] + after["images"]
    offline_cpu = before["cpu"]["ours"] + after["cpu"]["ours"]
    offline_generator_cpu = _generator_cpu_s(before["cpu"]) + _generator_cpu_s(after["cpu"])
    ratios = {
        "images_per_s": ratio,
        "per_cpu_s": (served["images"] / served["cpu"]["ours"]) / (offline_images / offline_cpu),
        "generator_per_cpu_s": (stats["images"] / _generator_cpu_s(served["cpu"]))
        / (offline_images / offline_generator_cpu),
    }
    print(f"  images per CPU second, served / offline: {ratios['per_cpu_s']:.3f} with every process of our Ray counted "
          f"(served {served['images'] / served['cpu']['ours']:.3f}, offline {offline_images / offline_cpu:.3f}); "
          f"{ratios['generator_per_cpu_s']:.3f} in the generator replicas against the offline workers")
    print(f"  served / offline images/s: {ratio:.3f}  (target >= {args.target}: "
          f"{'met' if ratio >= args.target else 'NOT met'})", flush=True)
    return ratios


def main(argv: list[str] | None = None) -> int:
    from pipelines.serve.settings import ROUTINGS, ServeSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'sd21-random', or a diffusers folder/URI")
    parser.add_argument("--adapter", help="adapter file (default: the generated model's)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the measured window")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the window, not counted "
                        "(at least one batch's time: the queues start empty)")
    # Real use is 20-50 steps; at a few steps the fixed per-request costs (HTTP, routing, PNG) weigh more than
    # they ever do in production (bench/results/2026-12-03-serve-ratio-cpu.md has the ratio at 4 to 20 steps).
    parser.add_argument("--steps", type=int, default=20)
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
    parser.add_argument("--target", type=float, default=0.9, help="served/offline images/s to report against")
    parser.add_argument("--json-out", help="also write the figures as JSON here")
    parser.add_argument("--workload", choices=["generate", "grid"], default="generate")
    parser.add_argument("--routing", default=ServeSettings.model_fields["routing"].default,
                        help=f"the app's routing, or several comma-separated, run in turn ({', '.join(ROUTINGS)})")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each routing (in turn: A B A B)")
    parser.add_argument("--grid-subjects", type=int, default=4, help="grid workload: subjects per grid")
    parser.add_argument("--grid-prompts", type=int, default=2, help="grid workload: prompts per grid")
    parser.add_argument("--caches-per-replica", type=int, help="LRU slots per replica (default: every subject)")
    args = parser.parse_args(argv)
    args.offline_batch_size = args.offline_batch_size or args.batch_size

    import torch

    from dreamcache.runtime import pick_device, quiet_libraries

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

    routings = args.routing.split(",")
    unknown = set(routings) - set(ROUTINGS)
    if unknown:
        parser.error(f"--routing: unknown {', '.join(sorted(unknown))}; known: {', '.join(ROUTINGS)}")
    device = pick_device(args.device)
    print(f"model {args.model}, {args.steps} steps, {args.guidance} guidance, batch {args.batch_size}, "
          f"{args.subjects} subjects, {args.replicas} replicas; {device}"
          f"{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{os.cpu_count()} CPU cores, torch threads {args.torch_threads or torch.get_num_threads()}", flush=True)

    from ray import serve

    from pipelines.kernel.ray_runtime import init_ray

    init_ray(address=args.ray_address)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    order = [routing for _ in range(args.repeats) for routing in routings]  # in turn: A B A B
    runs: list[dict] = []
    failed = False
    try:
        baselines = [offline_images_per_s(args, app_args_of(args, model, adapter, "unused", order[0]), references)]
        print(f"offline batched generation: {baselines[0]['images_per_s']:.3f} images/s", flush=True)
        for i, routing in enumerate(order):
            app_args = app_args_of(args, model, adapter, str(work / f"caches-{i}"), routing)
            served, stats = serve_and_load(args, app_args, references)
            baselines.append(offline_images_per_s(args, app_args, references))
            ratios = report_run(args, routing, served, stats, baselines[i], baselines[i + 1])
            runs.append({"routing": routing, "served": served, "replica": stats, "ratio": ratios["images_per_s"],
                         "ratios": ratios,
                         "offline_images_per_s": {"before": baselines[i], "after": baselines[i + 1]}})
            errors = {k: v for k, v in served["statuses"].items() if k not in ("200", "503")}
            errors.update({f"cell {k}": v for k, v in served.get("cell_errors", {}).items() if k != "503"})
            if errors or served["503_without_retry_after"]:
                print(f"FAILED ({routing}): errors other than 503: {errors}", file=sys.stderr)
                failed = True
    finally:
        serve.shutdown()
    print("== routings compared (mean over runs; each run's figures above)")
    for routing in routings:
        mine = [run for run in runs if run["routing"] == routing]
        if not mine:
            continue
        mean = lambda key: statistics.fmean(run["served"][key] for run in mine)  # noqa: E731
        hits = statistics.fmean(run["served"].get("cache_hit_ratio", float("nan")) for run in mine)
        print(f"  {routing:17s} runs {len(mine)}  images/s {mean('images_per_s'):.3f} "
              f"({', '.join(format(run['served']['images_per_s'], '.3f') for run in mine)})  p50 {mean('p50_s'):.3f} s  "
              f"p95 {mean('p95_s'):.3f} s  cache hit ratio {hits:.3f}  served/offline "
              f"{statistics.fmean(run['ratio'] for run in mine):.3f} (per CPU second "
              f"{statistics.fmean(run['ratios']['per_cpu_s'] for run in mine):.3f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"offline_images_per_s": baselines, "runs": runs,
                                                   "args": vars(args)}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
