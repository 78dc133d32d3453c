"""Batch generation job: every subject of a cache prefix or caching manifest x prompts x seeds -> PNGs + manifest.

    ray job submit --working-dir . -- python jobs/generate_batch.py --model M --adapter A \\
        --caches s3://catalog/caches/manifest.parquet --prompts s3://catalog/campaign.jsonl --seeds 0,1 \\
        --out s3://catalog/renders --gpus-per-actor 1 --actors 2

Without a cluster (no RAY_ADDRESS) the same command starts a local Ray. Only rows without an image are rendered;
a missing or broken cache is an error row in the manifest, not a failed job. Exit codes: 0 when the job ran
(error rows included), 2 for bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the repository root without installing the project.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Only the light command-line module here: build_parser() (and the manifest checks of tests/test_infra.py)
# must not import Ray or torch.
from dreamcache.cli_args import ArgumentParser  # noqa: E402
from pipelines.generation.args import add_generation_arguments, config_from_args, summary_lines  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="generate_batch", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_generation_arguments(parser)
    parser.add_argument("--summary-json", help="also write the run summary as JSON to this path or URI")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dreamcache import storage
    from dreamcache.cli import user_errors
    from pipelines.generation import run_generation
    from pipelines.kernel.ray_runtime import run_entrypoint

    def work() -> list[str]:
        summary = run_generation(config_from_args(args))
        if args.summary_json:
            storage.write_bytes(args.summary_json, json.dumps(summary.as_dict(), indent=2).encode())
        return summary_lines(summary)

    return run_entrypoint("generate_batch", work, user_errors(), quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
