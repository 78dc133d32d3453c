"""The installed ``dreamcache`` command: the method's commands plus the ones that run on Ray."""

from __future__ import annotations

import argparse
import sys

from dreamcache.cli import main as method_main


def add_ray_commands(sub: argparse._SubParsersAction) -> None:
    """Ray-backed subcommands. Their parsers come from light ``*_args`` modules; Ray, torch and diffusers are
    imported by the command functions, so ``dreamcache --help`` stays fast."""
    _add_serve_command(sub)
    _add_cache_catalog_command(sub)
    _add_generate_batch_command(sub)
    _add_manifest_command(sub)
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
# Flags that map one-to-one onto the Serve app's args (pipelines.serve.settings.ServeSettings); --arg sets any other.
_SERVE_FLAGS = {
    "model": "model", "adapter": "adapter", "caches": "caches", "replicas": "replicas",
    "gpus_per_replica": "gpus_per_replica", "cpus_per_replica": "cpus_per_replica",
    "max_batch_size": "max_batch_size", "max_caches_per_replica": "max_caches_per_replica",
    "max_ongoing_requests": "max_ongoing_requests", "request_timeout": "request_timeout_s",
    "device": "device", "dtype": "dtype",
}


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    from dreamcache.cli_args import add_config_arguments
    from dreamcache.runtime import DTYPES, ModelSpec

    p = sub.add_parser("serve", help="run the HTTP API and web page on Ray Serve (a local Ray unless $RAY_ADDRESS)")
    add_config_arguments(p, ModelSpec, only=("model",))
    p.add_argument("--adapter", help="adapter safetensors file (path or s3:// URI)")
    p.add_argument("--caches", required=True, help="cache store: folder or s3:// prefix of <subject_id>.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, help="generator replicas (default 1)")
    p.add_argument("--gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-replica", type=float)
    p.add_argument("--max-batch-size", type=int, help="images per UNet batch (default 8)")
    p.add_argument("--max-caches-per-replica", type=int, help="subject caches kept on each replica's device")
    p.add_argument("--max-ongoing-requests", type=int, help="per generator replica")
    p.add_argument("--request-timeout", type=float, help="server-side deadline per request, seconds (504 after)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--dtype", choices=DTYPES, help="auto (default): fp16 on GPU, fp32 on CPU")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other app argument (JSON value, e.g. --arg 'autoscaling={\"min_replicas\":1}')")
    p.add_argument("--ray-address", help="a Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="an autoscaler adds nodes for the replicas: do not fail when the cluster lacks them now")
    p.set_defaults(func=cmd_serve)


def serve_app_args(args: argparse.Namespace) -> dict:
    """The Serve app's args from the command line: the flags given, then every --arg KEY=VALUE."""
    import json

    from dreamcache.cli import UsageError

    app_args = {key: getattr(args, flag) for flag, key in _SERVE_FLAGS.items() if getattr(args, flag) is not None}
    for item in args.arg:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg expects KEY=VALUE, got {item!r}")
        try:
            app_args[key] = json.loads(raw)
        except json.JSONDecodeError:
            app_args[key] = raw  # a bare string
    return app_args


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
