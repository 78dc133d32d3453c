"""Training benchmark: samples/s of the adapter training loop against a bare forward+backward loop, same run.

Both sides use the same model, batch, precision and checkpointing setting:

  bare loop   preloaded tensors; VAE encode + text encode + caching pass (no grad), UNet forward + backward with
              the adapters attending, AdamW step. No data pipeline, no loop machinery.
  train()     dreamcache.training.train on a synthetic Parquet triplet dataset: decoding and the reference
              construction of spec 3.2 in ``--data-workers`` DataLoader processes, the seeded draws, logging
              (checkpoint writes fall outside the measured window).

The ratio train/bare says what the loop costs on top of the method's own compute. On a GPU the script also reports
peak memory (torch.cuda.max_memory_allocated) per setting.

    python bench/training.py                                   # tiny model on CPU, batch 4 (what `make bench` runs)
    python bench/training.py --model sd21-random --device cuda --batches 8,16 --checkpointing both --steps 6

``sd21-random`` is the SD 2.1-base architecture with random weights (bench/method.py): the cost does not depend
on the values.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreamcache.cache import extract_features  # noqa: E402
from dreamcache.models import tiny_components  # noqa: E402
from dreamcache.pipeline import DreamCachePipeline  # noqa: E402
from dreamcache.training import AdapterTrainer, TrainingConfig, train  # noqa: E402
from dreamcache.triplets import write_triplets  # noqa: E402
from timing import timed_runs  # noqa: E402 - bench/timing.py


def synthetic_rows(count: int, size: int, seed: int = 0) -> list[dict]:
    """Coloured rectangles and ellipses on coloured backgrounds, with masks, as PNG-encoded triplet rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        target = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 220, 3)))
        mask = Image.new("L", (size, size), 0)
        side = int(rng.integers(size // 3, size * 3 // 4))
        left, top = (int(v) for v in rng.integers(0, size - side, 2))
        box, colour = (left, top, left + side, top + side), tuple(int(v) for v in rng.integers(0, 256, 3))
        draw = ImageDraw.Draw(target).ellipse if i % 2 else ImageDraw.Draw(target).rectangle
        draw(box, fill=colour)
        (ImageDraw.Draw(mask).ellipse if i % 2 else ImageDraw.Draw(mask).rectangle)(box, fill=255)
        rows.append({"id": f"bench-{i}", "caption": f"a shape number {i}", "target": target, "mask": mask})
    return rows


def bare_loop(trainer: AdapterTrainer, batch_size: int, steps: int) -> list[float]:
    """Seconds per step of the bare loop, ``steps`` steps after one warm-up step."""
    pipe, device = trainer.pipe, trainer.device
    resolution = trainer.resolution
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(batch_size, 3, resolution, resolution, generator=generator).mul(2).sub(1).to(device)
    reference = torch.rand(batch_size, 3, resolution, resolution, generator=generator).mul(2).sub(1)
    ids = pipe.tokenizer(["a shape on a table"] * batch_size, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    empty = pipe.encode_prompt([""]).detach()
    unet_dtype = pipe.unet.dtype
    autocast = (torch.autocast(device.type, dtype=trainer.autocast_dtype) if trainer.autocast_dtype
                else torch.autocast(device.type, enabled=False))

    def step() -> None:
        with torch.no_grad():
            z0 = pipe.vae.encode(target.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
            text = pipe.text_encoder(ids)[0]
            features = extract_features(pipe.unet, pipe.vae, pipe.layers, reference, empty,
                                        pipe.scheduler.alphas_cumprod, list(range(batch_size)))
        caches = [{k: v[i : i + 1] for k, v in features.items()} for i in range(batch_size)]
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noise = torch.randn_like(z0, dtype=torch.float32)
        noisy = pipe.scheduler.add_noise(z0.float(), noise, t)
        with pipe.adapters.reference(caches, list(range(batch_size))):
            with autocast:
                loss = F.mse_loss(pipe.unet(noisy.to(unet_dtype), t, encoder_hidden_states=text).sample.float(), noise)
            loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return timed_runs(step, device, steps)


def train_loop(trainer: AdapterTrainer, config: TrainingConfig) -> float:
    """samples/s of train() over its last logging window (``config.steps`` is two windows: warm-up, measured)."""
    reports: list[dict] = []
    train(config, report=reports.append, trainer=trainer)
    return reports[-1]["samples_per_s"]


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.model == "tiny":
        components = tiny_components()
    else:
        from method import sd21_random_components

        with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
            components = sd21_random_components()
    pipe = DreamCachePipeline(**components)
    resolution = args.resolution or pipe.default_resolution
    work = Path(tempfile.mkdtemp(prefix="dreamcache-bench-train-"))
    write_triplets(synthetic_rows(args.rows, resolution), str(work / "data.parquet"), row_group_size=32)
    try:
        return _measure(args, device, pipe, resolution, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, device: torch.device, pipe: DreamCachePipeline, resolution: int,
             work: Path) -> list[dict]:
    results = []
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for batch_size in [int(b) for b in args.batches.split(",")]:
        for ckpt in checkpointing:
            config = TrainingConfig(
                model="<in memory>", data=str(work / "data.parquet"), out=str(work / f"run-{batch_size}-{ckpt}"),
                steps=2 * args.steps, log_every=args.steps, checkpoint_every=10**9, batch_size=batch_size,
                resolution=resolution, mixed_precision=args.mixed_precision, gradient_checkpointing=ckpt,
                device=str(device), data_workers=args.data_workers, lr=1e-5,
            )
            trainer = AdapterTrainer(config, pipe=pipe)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            bare_times = bare_loop(trainer, batch_size, args.steps)
            bare_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ours = train_loop(trainer, config)
            ours_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            # The baseline is measured before and after: on a shared machine a load change hits both sides.
            bare = batch_size / statistics.median(bare_times + bare_loop(trainer, batch_size, args.steps))
            row = {"model": args.model, "device": str(device), "precision": str(trainer.autocast_dtype or "fp32"),
                   "batch": batch_size, "checkpointing": ckpt, "bare_samples_per_s": bare,
                   "train_samples_per_s": ours, "ratio": ours / bare, "bare_peak_gib": bare_peak,
                   "train_peak_gib": ours_peak}
            results.append(row)
            peak = f"   peak {bare_peak:6.2f} / {ours_peak:6.2f} GiB" if bare_peak is not None else ""
            print(f"batch {batch_size:3d}  checkpointing {'on ' if ckpt else 'off'}  bare {bare:8.2f} samples/s  "
                  f"train() {ours:8.2f} samples/s  ratio {ours / bare:5.3f}{peak}", flush=True)
            del trainer
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21-random"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="4", help="comma-separated batch sizes")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after as many warm-up steps)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--rows", type=int, default=128, help="synthetic triplets in the dataset")
    parser.add_argument("--data-workers", type=int, default=4)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}; model {args.model}")
    results = run(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
