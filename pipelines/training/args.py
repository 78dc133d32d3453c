"""The command line of adapter training, shared by ``jobs/train_adapters.py`` and ``dreamcache train-adapters``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder (path or s3://)")
    p.add_argument("--data", required=True, help="triplet Parquet file, folder or s3:// prefix")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for checkpoints/ and adapter.safetensors")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="samples per worker and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--resolution", type=int, help="training image size (default: the model's)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default="auto", help="auto (last checkpoint under --out), never, or a checkpoint URI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-dropout", type=float, default=0.07)
    p.add_argument("--init-adapter", help="start from this adapter file instead of a fresh initialisation")
    p.add_argument("--adapter-init", choices=["default", "identity"], default="default",
                   help="fresh init of linear_cat: the official default, or identity (deviation A7)")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="of the final adapter file")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, help="clip gradients (the official run does not)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--data-cpus", type=float, default=0.5, help="CPUs per Ray Data preparation task")
    p.add_argument("--max-failures", type=int, default=0, help="restarts of a failed worker group (each resumes)")
    p.add_argument("--ray-storage", help="where Ray Train keeps the run folder and its checkpoints (default: --out)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-ray", action="store_true", help="train in this process (local data path, exact resume)")
