"""Issue 12 probe: identity/colour/context of one model + adapter under several sampling settings.

Usage: python bench/toy_world_experiments/probe.py MODEL_DIR ADAPTER [--out results.jsonl]
Prints one JSON line per setting (guidance mode, text scale, image scale, adapter scale)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from dreamcache import toy_model, toy_world
from dreamcache.pipeline import DreamCachePipeline

SETTINGS = [  # (guidance, s_T, s_I, adapter scale)
    ("joint", 7.5, 0.4, 1.0),
    ("joint", 7.5, 0.4, 1.5),
    ("joint", 7.5, 0.4, 2.0),
    ("joint", 12.0, 0.4, 1.0),
    ("compositional", 7.5, 3.0, 1.0),
    ("compositional", 7.5, 6.0, 1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("adapter")
    parser.add_argument("--out", default=None)
    parser.add_argument("--settings", default=None, help="JSON list of [guidance, s_T, s_I, adapter_scale]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = DreamCachePipeline.from_pretrained(args.model, adapter=args.adapter)
    pipe.set_progress_bar_config(disable=True)
    ids = toy_world.SUBJECT_IDS
    refs = [toy_world.reference_image(toy_world.subject(s)) for s in ids]
    caches = dict(zip(ids, pipe.build_caches(refs, seed=0)))
    settings = json.loads(args.settings) if args.settings else SETTINGS
    for guidance, s_t, s_i, a in settings:
        t0 = time.perf_counter()
        pipe.set_adapter_scale(a)
        images, got_ids, asked = toy_model.generate(pipe, ids, toy_world.PROMPTS, caches, guidance,
                                                    guidance_scale=s_t, image_guidance_scale=s_i)
        s = toy_world.score(images, got_ids, asked)
        line = {"model": args.model, "adapter": args.adapter, "guidance": guidance, "s_T": s_t, "s_I": s_i,
                "adapter_scale": a, **{k: round(v, 3) for k, v in s.row().items()},
                "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
