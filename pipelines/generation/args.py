"""The command line of batch generation, shared by ``jobs/generate_batch.py`` and ``dreamcache generate-batch``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dreamcache.errors import InvalidValue

from .settings import GenerationJobConfig, parse_seeds

if TYPE_CHECKING:
    from .job import GenerationSummary


def summary_lines(summary: GenerationSummary) -> list[str]:
    lines = [f"run {summary.run_id}: {summary.planned} planned, {summary.rendered} rendered, "
             f"{summary.skipped} already there, {summary.failed} failed ({summary.elapsed_s:.1f} s)",
             f"manifest:      {summary.manifest_uri}"]
    if summary.contact_sheet_uri:
        lines.append(f"contact sheet: {summary.contact_sheet_uri}")
    return lines


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder: local path or s3:// prefix")
    p.add_argument("--adapter", required=True, help="adapter safetensors file (path or s3:// URI)")
    p.add_argument("--caches", required=True,
                   help="a caching job's output prefix (its manifest is read), a prefix of <subject_id>.safetensors "
                        "files, or a single-file caching manifest (.parquet)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompts", help="prompts file: one prompt per line, or JSONL with prompt, negative_prompt, "
                                        "guidance_scale, image_guidance_scale")
    what.add_argument("--plan", help="explicit plan (JSONL or Parquet): subject_id, prompt, [seed, negative_prompt, "
                                     "guidance_scale, image_guidance_scale]")
    p.add_argument("--subjects", help="comma-separated subject ids (default: every subject of --caches)")
    p.add_argument("--subjects-file", help="file of subject ids, one per line")
    p.add_argument("--seeds", default="0", help="seeds per prompt: 0,1,5 or 0-3 (default 0)")
    p.add_argument("--out", default=GenerationJobConfig.out, help="output folder or s3:// prefix")
    p.add_argument("--steps", type=int, default=GenerationJobConfig.steps)
    # One vocabulary with `dreamcache generate`: --guidance is the mode, --guidance-scale the text scale.
    p.add_argument("--guidance-scale", type=float, default=GenerationJobConfig.guidance_scale,
                   help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=GenerationJobConfig.image_guidance_scale)
    p.add_argument("--guidance", "--guidance-mode", dest="guidance", choices=["compositional", "joint"],
                   default=GenerationJobConfig.guidance, help="guidance mode (--guidance-mode: its older name)")
    p.add_argument("--negative-prompt", help="negative prompt for prompts that do not name one")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=GenerationJobConfig.batch_size)
    p.add_argument("--actors", type=int, default=GenerationJobConfig.actors, help="actor pool size")
    p.add_argument("--max-actors", type=int, help="autoscale the actor pool up to this many")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs now, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="default: 1 with a GPU, 0.5 without")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="wait for nodes that offer the actors' resources (an autoscaling cluster) instead of "
                        "failing at once when no node has them")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--contact-sheet", choices=["new", "all", "none"], default="new",
                   help="sheets for subjects touched this run (new), every subject (all), or none")
    p.add_argument("--contact-sheet-cell", type=int, default=GenerationJobConfig.contact_sheet_cell)
    p.add_argument("--run-id", help="name of this run (default: UTC time + random suffix)")


def config_from_args(args: argparse.Namespace) -> GenerationJobConfig:
    subjects: list[str] | None = None
    if args.subjects is not None or args.subjects_file is not None:
        subjects = [s.strip() for s in (args.subjects or "").split(",") if s.strip()]
        if args.subjects_file:
            from .plan import read_text  # here: it loads the storage clients, which --help does not need

            subjects += [line.strip() for line in read_text(args.subjects_file, "subjects file").splitlines()
                         if line.strip() and not line.lstrip().startswith("#")]
        if not subjects:
            raise InvalidValue("--subjects/--subjects-file name no subject")
    return GenerationJobConfig(
        model=args.model, adapter=args.adapter, caches=args.caches, prompts=args.prompts, plan=args.plan,
        subjects=subjects, seeds=parse_seeds(args.seeds), out=args.out, steps=args.steps,
        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
        guidance=args.guidance, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        batch_size=args.batch_size, actors=args.actors, max_actors=args.max_actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, device=args.device,
        dtype=args.dtype, torch_threads=args.torch_threads, contact_sheet=args.contact_sheet,
        contact_sheet_cell=args.contact_sheet_cell, run_id=args.run_id, wait_for_resources=args.wait_for_resources,
    )
