"""The command line of batch generation, shared by ``jobs/generate_batch.py`` and ``dreamcache generate-batch``.

Light on purpose: building the parser imports neither Ray nor torch, so ``--help`` is fast. Its options are the
fields of GenerationJobConfig (dreamcache.cli_args).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dreamcache.cli_args import add_config_arguments, comma_list, config_from_namespace
from dreamcache.errors import InvalidValue

from .settings import GenerationJobConfig

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
    add_config_arguments(p, GenerationJobConfig)
    p.add_argument("--subjects-file", help="file of subject ids, one per line (added to --subjects)")


def config_from_args(args: argparse.Namespace) -> GenerationJobConfig:
    subjects = comma_list(args.subjects) if args.subjects is not None else None
    if args.subjects_file:
        from .plan import read_text  # here: it loads the storage clients, which --help does not need

        subjects = (subjects or []) + [line.strip() for line in read_text(args.subjects_file, "subjects file").splitlines()
                                       if line.strip() and not line.lstrip().startswith("#")]
    if subjects == []:
        raise InvalidValue("--subjects/--subjects-file name no subject")
    return config_from_namespace(GenerationJobConfig, args, subjects=subjects)
