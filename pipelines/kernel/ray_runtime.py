"""Connect to Ray the same way from every job and app: a cluster if one is named, else a local one.

``ray job submit`` sets RAY_ADDRESS for the entrypoint, so the same command runs on a cluster or, without
one, starts a local Ray bound to 127.0.0.1 with usage stats off and token auth off (a laptop or CI run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from dreamcache.cli_args import option

logger = logging.getLogger(__name__)


def add_ray_address_argument(parser: argparse.ArgumentParser) -> None:
    """The --ray-address option every Ray command and job shares (init_ray's ``address``)."""
    parser.add_argument("--ray-address", help="a Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")


def wait_for_resources_field() -> Any:
    """The jobs' --wait-for-resources option (a config field; see dreamcache.cli_args)."""
    return option(False, "wait for nodes that offer the actors' resources (an autoscaling cluster) instead of "
                         "failing at once when no node has them")

# Set before a local Ray starts: keep its listeners on loopback, phone nothing home, no token files.
LOCAL_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
# A job runs several Ray Data executions in a row (plan, compute, publish), and Ray by default kills idle workers
# above one per CPU after 1 s, so each execution started its task workers again: seconds per worker on a small
# machine. Keeping them for a minute took a 3-subject rerun from 72 s to 19 s on the 2-core box (loaded).
IDLE_WORKER_KEEP_MS = 60_000


def init_ray(address: str | None = None, num_cpus: float | None = None, **kwargs) -> None:
    """Idempotent ``ray.init``: ``address`` or $RAY_ADDRESS names a cluster; otherwise a local Ray starts.

    A local Ray inherits this process's environment, so the AWS_* variables reach every worker.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_data_console()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        return
    for key, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # address="local": a stale cluster file from an earlier `ray start` must not make this connect there.
    system_config = {**local_system_config(num_cpus), **kwargs.pop("_system_config", {})}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _system_config=system_config, **kwargs)
    logger.info("started a local Ray: %s", ray.cluster_resources())


def local_system_config(num_cpus: float | None = None) -> dict[str, int]:
    """Ray system settings for a one-machine Ray (``ray.init`` here, or ``ray start --system-config``)."""
    cpus = int(num_cpus or os.cpu_count() or 1)
    return {"num_workers_soft_limit": max(16, 2 * cpus), "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS}


def check_resources(needs: dict[str, float], what: str, wait: bool = False, count: int = 1) -> None:
    """Fail fast, in one line, when no node of the cluster can hold ``needs`` (one actor's resources: they must
    fit on a single node), or when the whole cluster cannot hold ``count`` of them, instead of waiting forever
    for nodes that never come. ``wait=True`` skips the check: for clusters whose autoscaler adds such nodes on
    demand (the KubeRay manifests pass --wait-for-resources)."""
    import ray

    from dreamcache.errors import DreamCacheError

    needs = {k: v for k, v in needs.items() if v}
    if wait or not needs:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    hint = "lower the request, or pass --wait-for-resources if an autoscaler adds such nodes"
    if not any(all(node.get(k, 0) >= v for k, v in needs.items()) for node in nodes):
        offered = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(node.items()) if not k.startswith("node:")
                                      and k not in ("memory", "object_store_memory")) for node in nodes)
        raise DreamCacheError(f"{what} need {', '.join(f'{k} {v:g}' for k, v in needs.items())} on one node, but no "
                              f"node of the cluster offers that (nodes: {offered or 'none'}); {hint}",
                              kind="unavailable")
    total = {k: sum(node.get(k, 0) for node in nodes) for k in needs}
    short = {k: v * count for k, v in needs.items() if v * count > total[k]}
    if short:
        raise DreamCacheError(f"{count} of {what} need {', '.join(f'{k} {v:g}' for k, v in short.items())} in all, "
                              f"but the cluster has {', '.join(f'{k} {total[k]:g}' for k in short)}; {hint}",
                              kind="unavailable")


def quiet_ray_data_console() -> None:
    """Ray Data's multi-line progress blocks and per-dataset INFO lines leave the console (they stay in Ray's
    ray-data.log): the jobs print their own progress line (``kernel.run.Progress``)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not handler.__class__.__name__.endswith("FileHandler"):
            handler.setLevel(logging.WARNING)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """What an entry point reports as bad input (exit 2, one line): the DreamCacheError family and storage
    failures (a missing object, refused credentials); everything else is a bug and keeps its traceback."""
    from dreamcache.errors import DreamCacheError
    from dreamcache.storage import StorageError

    return DreamCacheError, StorageError


def run_entrypoint(name: str, work: Callable[[], Iterable[str]],
                   user_errors: tuple[type[BaseException], ...] = (), quiet: bool = False) -> int:
    """What every `jobs/*.py` main does: log to stderr, run, print the summary lines; bad input -> exit 2."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lines = list(work())
    except bad_input_errors() + tuple(user_errors) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
