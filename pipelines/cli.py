"""The installed ``dreamcache`` command: the method's commands plus the ones that run on Ray."""

from __future__ import annotations

import argparse
import sys

from dreamcache.cli import main as method_main


def add_ray_commands(sub: argparse._SubParsersAction) -> None:
    """Ray-backed subcommands; each module registers its own parser and imports Ray only when run."""


def main(argv: list[str] | None = None) -> int:
    return method_main(argv, extend=add_ray_commands)


if __name__ == "__main__":
    sys.exit(main())
