"""Issue 12 experiment: the whole toy recipe with another architecture (and optionally other stage settings).

Usage: python bench/toy_world_experiments/build_arch.py OUT_DIR '{"arch": {"unet_channels": [16, 32, 64], "vae_channels": [16, 32]}}'
Runs ``toy_model.build`` (data, VAE, base, adapters, evaluation) into OUT_DIR; build.json holds times and accuracies."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

from dreamcache import toy_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", help="JSON: BuildSettings fields; 'arch' a dict of ArchitectureSettings fields")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = json.loads(args.overrides)
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.pop("arch", {}).items()}
    settings = replace(toy_model.BuildSettings(), **overrides)
    settings.arch = replace(settings.arch, **arch)
    result = toy_model.build(args.out, settings=settings)
    print(json.dumps(result.summary(), indent=1, default=str))
    print(toy_model.results_table(result.evaluation))


if __name__ == "__main__":
    main()
