"""Issue 12 experiment: train DreamCache adapters on the committed toy base model with one variant of the
training settings, then score them (identity / colour / context / position) under both guidance modes.

Usage: python bench/toy_world_experiments/adapters.py NAME '{"steps": 600, "augment": {"erase_p": 0}}' [--model DIR]
Writes bench/toy_world_experiments/runs/NAME/ (training output, adapter) and appends one JSON line per setting to
bench/toy_world_experiments/results.jsonl."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from dreamcache import storage, toy_model, toy_world
from dreamcache.pipeline import DreamCachePipeline
from dreamcache.training import TrainingConfig, train
from dreamcache.training_config import ReferenceAugment

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("overrides", help="JSON: TrainingConfig fields; 'augment' a dict of ReferenceAugment fields")
    parser.add_argument("--model", default=str(toy_model.MODEL_DIR))
    parser.add_argument("--triplets", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = HERE / "runs" / args.name
    run.mkdir(parents=True, exist_ok=True)
    data = HERE / "runs" / f"train-{args.triplets}.parquet"
    if not data.exists():
        toy_world.write_triplets(data, args.triplets, 0)
    overrides = json.loads(args.overrides)
    augment = ReferenceAugment(**overrides.pop("augment", {}))
    settings = toy_model.BuildSettings()
    config = TrainingConfig(
        model=args.model, data=str(data), out=str(run / "train"), steps=settings.adapter_steps,
        batch_size=settings.adapter_batch, lr=settings.adapter_lr, resolution=toy_world.SIZE, seed=0,
        checkpoint_every=10_000, keep_checkpoints=1, log_every=1, data_workers=1,
        adapter_init=settings.adapter_init, device="cpu", resume="never", augment=augment,
    )
    if "timestep_range" in overrides:
        overrides["timestep_range"] = tuple(overrides["timestep_range"])
    config = replace(config, **overrides)
    config.checkpoint_every = config.steps
    losses: list[float] = []
    t0 = time.perf_counter()
    result = train(config, report=lambda m: losses.append(float(m["loss"])))
    train_s = time.perf_counter() - t0
    adapter = run / "adapter.safetensors"
    adapter.write_bytes(storage.read_bytes(result.adapter_uri))

    pipe = DreamCachePipeline.from_pretrained(args.model, adapter=str(adapter))
    pipe.set_progress_bar_config(disable=True)
    ids = toy_world.SUBJECT_IDS
    caches = dict(zip(ids, pipe.build_caches([toy_world.reference_image(toy_world.subject(s)) for s in ids], seed=0)))
    tail = sum(losses[-50:]) / max(1, len(losses[-50:]))
    for guidance, s_i in (("joint", 0.4), ("compositional", 0.4), ("compositional", 3.0)):
        images, got, asked = toy_model.generate(pipe, ids, toy_world.PROMPTS, caches, guidance, image_guidance_scale=s_i)
        s = toy_world.score(images, got, asked)
        line = {"run": args.name, "overrides": json.loads(args.overrides), "model": args.model, "guidance": guidance,
                "s_I": s_i, **{k: round(v, 3) for k, v in s.row().items()}, "train_s": round(train_s),
                "loss_first": round(losses[0], 4), "loss_last50": round(tail, 4)}
        print(json.dumps(line), flush=True)
        with open(HERE / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
