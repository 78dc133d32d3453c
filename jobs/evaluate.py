"""DreamBench evaluation: cache each subject's reference, generate subjects x 25 prompts x 4 images, score them.

    ray job submit --working-dir . -- python jobs/evaluate.py --dataset s3://bench/dreambooth/dataset \\
        --model s3://models/sd21base --adapter s3://runs/sd21/adapter.safetensors --out s3://bench/eval/run1 \\
        --dino s3://models/dino-vits16 --clip s3://models/clip-vit-base-patch32 --actors 4

Writes <out>/scores.parquet (one row per image), <out>/summary.md (overall / objects / live next to the paper's
numbers) and prints the table. Caching and generation are incremental: a rerun renders only
what is missing (and scores every image again).
Without a Ray cluster (no RAY_ADDRESS) the same command starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from the root

from dreamcache.cli_args import ArgumentParser  # noqa: E402
from pipelines.evaluation.args import add_evaluation_arguments, evaluation_from_args  # noqa: E402 - light: no torch


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    add_evaluation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.evaluation import result_lines, run_evaluation
    from pipelines.kernel.ray_runtime import init_ray, run_entrypoint

    def work() -> list[str]:
        config = evaluation_from_args(args)
        init_ray(args.ray_address)
        return result_lines(run_evaluation(config))

    return run_entrypoint("evaluate", work)


if __name__ == "__main__":
    sys.exit(main())
