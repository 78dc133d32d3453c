"""What ``dreamcache serve`` checks before it deploys anything (issue 11, defect 11).

Without these checks a bad option surfaces minutes later, inside a replica that Serve restarts forever (a model
folder that is not there, CUDA asked of a CPU-only torch) or as a deployment that waits for nodes that never come
(GPUs the cluster does not have). Each check ends in one DreamCacheError line, which the CLI turns into exit 2.

    check_inputs    before Ray starts: model folder, adapter, cache store URI, the port (a local Ray only)
    check_cluster   once Ray is up, before deploying: the replicas' resources and device against the cluster
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from dreamcache import storage
from dreamcache.errors import DreamCacheError, InvalidValue

from ..kernel.model_info import check_model_inputs
from ..kernel.ray_runtime import check_resources
from .settings import ServeSettings

logger = logging.getLogger(__name__)


def check_inputs(settings: ServeSettings, host: str, port: int, local: bool) -> None:
    """The options that need no Ray. ``local``: this process starts the Ray (and so binds ``host:port``)."""
    check_model_inputs(settings.model, settings.adapter)
    check_cache_store(settings.caches)
    if local:
        check_port_free(host, port)
        check_device_here(settings.device)


def check_cache_store(caches: str) -> None:
    """A folder or S3 prefix that can be listed (an empty or new one is fine: the API registers subjects); not a
    file, not a missing bucket, not refused credentials."""
    location = storage.parse_uri(caches)
    if location.scheme == "file":
        if os.path.exists(location.path) and not os.path.isdir(location.path):
            raise InvalidValue(f"--caches {caches} is a file, not a folder of <subject_id>.safetensors caches")
        return
    # One LIST page, not the whole store: a missing bucket or refused key fails here as a StorageError.
    next(storage.iter_listing_shard(caches, (None, None), 0, 1, recursive=False), None)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DreamCacheError(f"--port {port}: {host}:{port} is already in use; pick another port or stop "
                                      "what listens there", kind="conflict") from None
            raise InvalidValue(f"--host {host} --port {port} cannot be bound: {exc.strerror or exc}") from None


def check_device_here(device: str) -> None:
    """A local Ray runs the replicas with this process's torch: CUDA asked of a CPU-only build fails now."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "torch, which finds no CUDA device"
        raise DreamCacheError(f"--device {device}: this machine has {build}; use --device auto or cpu, or a CUDA "
                              "torch on a GPU machine", kind="unavailable")


def check_cluster(settings: ServeSettings, wait: bool = False) -> None:
    """The replicas against the Ray cluster now up: one replica's CPUs and GPUs on one node, all replicas in the
    cluster, and a GPU for ``--device cuda``. ``wait``: an autoscaler adds nodes on demand, skip the counts."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0) > 0
    options = settings.generator_options(cluster_has_gpus=cluster_gpus)
    needs = {"CPU": options["ray_actor_options"]["num_cpus"], "GPU": options["ray_actor_options"]["num_gpus"]}
    if settings.device.startswith("cuda") and not needs["GPU"]:
        raise InvalidValue(f"--device {settings.device} but the generator replicas get no GPU ("
                           f"{'--gpus-per-replica 0' if settings.gpus_per_replica is not None else 'the cluster has none'})")
    # Autoscaling starts at min_replicas (Serve's default 1); more come only when an autoscaler can add nodes.
    replicas = int(settings.autoscaling.get("min_replicas", 1)) if settings.autoscaling else settings.replicas
    check_resources(needs, "the generator replicas", wait=wait, count=max(1, replicas))
    check_resources({"CPU": settings.ingress_cpus}, "the ingress replicas", wait=wait, count=settings.ingress_replicas)
    logger.info("serve preflight passed: %d generator replica(s) with %s", replicas, needs)
