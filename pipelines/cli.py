"""The installed ``dreamcache`` command: the method's commands plus the ones that run on Ray."""

from __future__ import annotations

import argparse
import sys

from dreamcache.cli import main as method_main
from dreamcache.cli_args import DefaultsFormatter


def add_ray_commands(sub: argparse._SubParsersAction) -> None:
    """Ray-backed subcommands. Their parsers come from light ``*_args`` modules; Ray, torch and diffusers are
    imported by the command functions, so ``dreamcache --help`` stays fast."""
    _add_serve_command(sub)
    _add_cache_catalog_command(sub)
    _add_generate_batch_command(sub)
    _add_manifest_command(sub)
    _add_vacuum_command(sub)
    _add_training_commands(sub)


# -- dreamcache train-adapters / evaluate ----------------------------------------------------------------------
def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    from pipelines.evaluation.args import add_evaluation_arguments
    from pipelines.training.args import add_training_arguments

    p = sub.add_parser("train-adapters", help="train the conditioning adapters on triplet data (Ray Train)")
    add_training_arguments(p)
    p.set_defaults(func=_cmd_train_adapters)
    p = sub.add_parser("evaluate", help="DreamBench: cache, generate, score (DINO, CLIP-I, CLIP-T)")
    add_evaluation_arguments(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train_adapters(args: argparse.Namespace) -> None:
    import json

    from pipelines.training import run_from_args

    print("train_adapters: " + json.dumps(run_from_args(args), default=str))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluation import evaluation_from_args, result_lines, run_evaluation
    from pipelines.kernel.ray_runtime import init_ray

    config = evaluation_from_args(args)
    init_ray(args.ray_address)
    print("\n".join(result_lines(run_evaluation(config))))


# -- dreamcache cache-catalog ----------------------------------------------------------------------------------
def _add_cache_catalog_command(sub: argparse._SubParsersAction) -> None:
    from pipelines.caching.args import add_caching_arguments

    p = sub.add_parser("cache-catalog", help="compute every subject's cache from a prefix or catalog on Ray "
                                             "(the twin of jobs/cache_catalog.py)")
    add_caching_arguments(p)
    p.set_defaults(func=_cmd_cache_catalog)


def _cmd_cache_catalog(args: argparse.Namespace) -> None:
    from pipelines.caching import config_from_args, run_caching
    from pipelines.kernel.ray_runtime import init_ray

    config = config_from_args(args)
    init_ray(args.ray_address)
    print(run_caching(config).line())


# -- dreamcache manifest ---------------------------------------------------------------------------------------
def _add_manifest_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="a job manifest's counts by status and action, and its error rows")
    p.add_argument("uri", help="a job's output prefix, its _manifests/<kind> folder, or a manifest.parquet file")
    p.add_argument("--json", action="store_true", help="every row as one JSON object per line instead")
    p.add_argument("--errors", type=int, default=20, help="error rows to print (--json prints all)")
    p.set_defaults(func=_cmd_manifest)


def _cmd_manifest(args: argparse.Namespace) -> None:
    from pipelines.manifest_report import print_manifests

    print_manifests(args.uri, as_json=args.json, max_errors=args.errors)


# -- dreamcache vacuum -----------------------------------------------------------------------------------------
def _add_vacuum_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vacuum", help="delete old manifest versions, and files only they name, under a job's output",
                       formatter_class=DefaultsFormatter)
    p.add_argument("uri", help="a job's output prefix or its _manifests/<kind> folder")
    p.add_argument("--keep-versions", type=int, default=5, help="newest versions always kept")
    p.add_argument("--retain-hours", type=float, default=168.0,
                   help="also keep every version that was current, and every unpublished file written, this recently "
                        "(a job that started then still reads them)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.set_defaults(func=_cmd_vacuum)


def _cmd_vacuum(args: argparse.Namespace) -> None:
    from pipelines.manifest_report import vacuum_manifests

    print("\n".join(vacuum_manifests(args.uri, args.keep_versions, args.retain_hours, args.dry_run)))


# -- dreamcache generate-batch ---------------------------------------------------------------------------------
def _add_generate_batch_command(sub: argparse._SubParsersAction) -> None:
    from pipelines.generation.args import add_generation_arguments

    p = sub.add_parser("generate-batch", help="render subjects x prompts x seeds on Ray: PNGs, manifest, contact sheet")
    add_generation_arguments(p)
    p.set_defaults(func=_cmd_generate_batch)


def _cmd_generate_batch(args: argparse.Namespace) -> None:
    from pipelines.generation import run_generation
    from pipelines.generation.args import config_from_args, summary_lines

    print("\n".join(summary_lines(run_generation(config_from_args(args)))))


# -- dreamcache serve ------------------------------------------------------------------------------------------
def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    # deferred: the app's options are the fields of its pydantic settings, imported only when `serve` is parsed.
    p = sub.add_parser("serve", help="run the HTTP API and web page on Ray Serve (a local Ray unless $RAY_ADDRESS)",
                       deferred=_add_serve_arguments)
    p.set_defaults(func=cmd_serve)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every Serve app argument as a flag (ServeSettings' fields: the same names as in a serve config's ``args``),
    then what only this command binds: the address, the Ray cluster."""
    from dreamcache.cli_args import add_model_arguments
    from pipelines.kernel.ray_runtime import add_ray_address_argument
    from pipelines.serve.settings import ServeSettings

    # The older --request-timeout still works: argparse takes it as the prefix of --request-timeout-s.
    add_model_arguments(p, ServeSettings)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    p.add_argument("--port", type=int, default=8000)
    add_ray_address_argument(p)
    p.add_argument("--wait-for-resources", action="store_true",
                   help="an autoscaler adds nodes for the replicas: do not fail when the cluster lacks them now")


def serve_app_args(args: argparse.Namespace) -> dict:
    """The Serve app's args from the command line (every ServeSettings field, given or default)."""
    from dreamcache.cli_args import model_values
    from pipelines.serve.settings import ServeSettings

    return model_values(ServeSettings, args)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from pipelines.kernel.ray_runtime import init_ray
    from pipelines.serve import preflight, run_local
    from pipelines.serve.settings import ServeSettings

    # Every bad option ends here in one line (exit 2), before anything deploys: see pipelines.serve.preflight.
    app_args = serve_app_args(args)
    settings = ServeSettings.model_validate(app_args)
    local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    preflight.check_inputs(settings, args.host, args.port, local=local)
    init_ray(args.ray_address)  # run_local's own init_ray then finds it started
    preflight.check_cluster(settings, wait=args.wait_for_resources)
    run_local(settings, host=args.host, port=args.port, ray_address=args.ray_address)


def main(argv: list[str] | None = None) -> int:
    return method_main(argv, extend=add_ray_commands)


if __name__ == "__main__":
    sys.exit(main())
