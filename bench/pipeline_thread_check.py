"""Does a pipeline call cost more in a worker thread (where the Serve replica runs it, via asyncio.to_thread) than
in the main thread (where the offline baseline runs it)? The same batch, alternately in each, with this thread's
user/sys CPU per call.

    PYTHONPATH=$PWD python bench/pipeline_thread_check.py [--repeats 3] [--steps 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from dreamcache.models import write_tiny_model
from dreamcache.pipeline import DreamCachePipeline

COLOURS = ["red", "blue", "green", "white", "black", "yellow", "purple", "orange"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the bench's replicas and offline workers
    model = write_tiny_model(Path(tempfile.mkdtemp(prefix="thread-check-")))
    pipe = DreamCachePipeline.from_pretrained(str(model), adapter=str(model / "adapter.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    caches = [pipe.cache_subject([Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)])], subject_id=f"s{i}")
              for i in range(args.batch)]
    prompts = [f"a photo {i}" for i in range(args.batch)]

    def call() -> tuple[float, float, float]:
        before, started = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        pipe(prompts, caches, negative_prompt=[""] * args.batch, num_inference_steps=args.steps,
             generator=generators, guidance="compositional")
        after = resource.getrusage(resource.RUSAGE_THREAD)
        return time.perf_counter() - started, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime

    pool = ThreadPoolExecutor(1)
    call(), pool.submit(call).result()  # warm-up in both threads
    for repeat in range(args.repeats):
        main_thread, worker_thread = call(), pool.submit(call).result()
        print(f"call {repeat + 1}: main thread wall/user/sys {'/'.join(f'{v:.2f}' for v in main_thread)} s; "
              f"worker thread {'/'.join(f'{v:.2f}' for v in worker_thread)} s", flush=True)


if __name__ == "__main__":
    main()
