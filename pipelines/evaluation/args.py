"""The command line of the DreamBench evaluation, shared by ``jobs/evaluate.py`` and ``dreamcache evaluate``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast. The negative
prompt's default (the official sampler's) is filled in by ``evaluation_from_args``: it lives in
``dreamcache.pipeline``, which loads diffusers.
"""

from __future__ import annotations

import argparse

from dreamcache.dreambench import IMAGES_PER_PROMPT, PROMPTS_PER_SUBJECT


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="DreamBooth dataset folder: <subject>/<NN>.jpg (path or s3://)")
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder (path or s3://)")
    p.add_argument("--adapter", required=True, help="adapter safetensors file")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--dino", required=True, help="transformers DINO ViT-S/16 folder (path or s3://)")
    p.add_argument("--clip", required=True, help="transformers CLIP ViT-B/32 folder (path or s3://)")
    p.add_argument("--references", help="reference images <subject>/<image> or <subject>.<ext> (e.g. background "
                                        "removed); default: the keep-list image of the dataset")
    p.add_argument("--caches", help="precomputed caches (prefix or caching manifest): skip the caching stage")
    p.add_argument("--subjects", help="comma-separated subset of the 30 subjects")
    p.add_argument("--prompts-per-subject", type=int, default=PROMPTS_PER_SUBJECT, help="below 25: a smoke run")
    p.add_argument("--images-per-prompt", type=int, default=IMAGES_PER_PROMPT)
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--image-guidance-scale", type=float, default=0.4)
    p.add_argument("--guidance", "--guidance-mode", dest="guidance", choices=["compositional", "joint"],
                   default="compositional", help="guidance mode, as in generate (--guidance-mode: its older name)")
    p.add_argument("--negative-prompt", help="default: the official sampler's negative prompt")
    p.add_argument("--cache-prompt", default="", help='"" as the paper; the negative prompt as the official sampler')
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1, help="actors per stage (caching, generation, scoring)")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    p.add_argument("--score-batch-size", type=int, default=32)
    p.add_argument("--backbone", choices=["SD 2.1", "SD 1.5"], help="paper row to compare with (default: detected)")
    p.add_argument("--run-id")
