"""Train DreamCache conditioning adapters on triplet data (Ray Train; DDP over all workers).

    ray job submit --working-dir . -- python jobs/train_adapters.py --model s3://bucket/models/sd15 \\
        --data s3://bucket/triplets --out s3://bucket/runs/sd15-adapters --steps 25000 --batch-size 16 \\
        --grad-accum 2 --workers 4 --gpu

Without a Ray cluster (no RAY_ADDRESS) the same command starts a local Ray and trains on one CPU worker;
``--no-ray`` trains in this process instead. A rerun with the same ``--out`` resumes from its last checkpoint
(``--resume never`` refuses to, ``--resume URI`` picks a checkpoint). The adapter file for generation is
``<out>/adapter.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from the root

from dreamcache.cli_args import ArgumentParser  # noqa: E402
from pipelines.training.args import add_training_arguments  # noqa: E402 - light: build_parser() needs no torch


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="train_adapters.py", description=__doc__.splitlines()[0])
    add_training_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.kernel.ray_runtime import run_entrypoint
    from pipelines.training import run_from_args

    return run_entrypoint(
        "train_adapters", lambda: ["train_adapters: " + json.dumps(run_from_args(args), default=str)],
        (FileNotFoundError,),  # a local triplet or model file; the DreamCacheError family is bad input already
    )


if __name__ == "__main__":
    sys.exit(main())
