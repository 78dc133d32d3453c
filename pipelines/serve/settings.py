"""Settings of the Serve app: one dataclass built from the application's ``args`` (serve config, RayService
``serveConfigV2``, or ``dreamcache serve``), checked once when the app is built so a typo fails the deploy,
not the first request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dreamcache import storage
from dreamcache.errors import InvalidValue

logger = logging.getLogger(__name__)

TOKEN_ENV = "DREAMCACHE_API_TOKEN"
TOKEN_FILE_ENV = "DREAMCACHE_API_TOKEN_FILE"

# Hard API limits (the OpenAPI schema states them); the settings below can only tighten the batch side.
MAX_IMAGES_PER_REQUEST = 8
# The values of ServeSettings.routing (pipelines/serve/routing.py says what each means).
ROUTINGS = ("multiplexed", "subject_affinity")


class SettingsError(InvalidValue):
    """An application argument is missing, unknown or out of range."""


@dataclass(frozen=True)
class ServeSettings:
    # -- what to serve --------------------------------------------------------------------------------------
    model: str  # diffusers SD folder: path or s3:// prefix
    caches: str  # CacheStore root: <caches>/<subject_id>.safetensors
    adapter: str | None = None  # adapter safetensors file (path or URI)
    device: str = "auto"  # auto: cuda when the replica has a GPU
    dtype: str = "auto"  # auto: fp16 on GPU, fp32 on CPU
    torch_threads: int | None = None  # CPU replicas: intra-op threads (None: leave torch's default)

    # -- generator replicas (GPU) ---------------------------------------------------------------------------
    replicas: int = 1  # fixed replica count, unless autoscaling is given
    autoscaling: dict[str, Any] | None = None  # Serve AutoscalingConfig, e.g. {min_replicas, max_replicas, ...}
    gpus_per_replica: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 16  # per replica; >= 2x the batch so one batch fills while another runs
    max_queued_requests: int = 64  # waiting for a replica, per ingress replica; beyond it: 503 + Retry-After
    max_batch_size: int = 8  # images per UNet batch (requests of different subjects share it)
    batch_wait_timeout_s: float = 0.02  # how long a batch waits to fill once its first request arrived
    max_caches_per_replica: int = 64  # per-replica LRU of subject caches held on the device
    # How a request reaches a replica holding its subject (pipelines/serve/routing.py): "multiplexed" (Serve's
    # multiplexed model ids) or "subject_affinity" (Serve's request router API, the subject as request data).
    # The default is the faster of the two in bench/results/2026-12-02-serve-routing-cpu.md.
    routing: str = "subject_affinity"

    # -- ingress (CPU) --------------------------------------------------------------------------------------
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    ingress_max_ongoing_requests: int = 512
    grid_max_in_flight: int = 32  # cells of one POST /v1/grids waiting on the generator replicas at once

    # -- request limits -------------------------------------------------------------------------------------
    request_timeout_s: float = 300.0  # server-side deadline of a request: 504 after it
    retry_after_s: int = 5  # the Retry-After of a 503
    max_upload_bytes: int = 20 * 2**20  # per reference image
    max_references: int = 8  # images per subject
    max_pixels: int = 40_000_000  # per reference image, checked before decoding
    min_side: int = 64  # generated image sides, pixels (multiples of 8)
    max_side: int | None = None  # None: twice the model's default resolution
    # What JSON image URIs may name. Empty by default (uploads only): a server reads what its credentials reach,
    # so any allowed prefix lets clients make it read objects there; name one explicitly, e.g. an uploads prefix.
    allowed_image_prefixes: tuple[str, ...] = ()

    # -- how new subjects are cached (as the caching job does) -----------------------------------------------
    resolution: int | None = None  # None: the model's default
    preprocess: str = "resize"
    cache_prompt: str = ""
    cache_seed: int = 0

    # -- auth -----------------------------------------------------------------------------------------------
    api_token_file: str | None = None  # else $DREAMCACHE_API_TOKEN_FILE, else $DREAMCACHE_API_TOKEN

    def __post_init__(self) -> None:
        for name in ("model", "caches"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise SettingsError(f"'{name}' is required (a path or s3:// URI)")
        positive = ("replicas", "max_ongoing_requests", "max_batch_size", "max_caches_per_replica", "ingress_replicas",
                    "ingress_max_ongoing_requests", "grid_max_in_flight", "retry_after_s", "max_upload_bytes", "max_references", "max_pixels",
                    "min_side")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"'{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.max_queued_requests, int) or (self.max_queued_requests < 1 and self.max_queued_requests != -1):
            raise SettingsError(f"'max_queued_requests' must be a positive integer or -1 (unbounded), got {self.max_queued_requests!r}")
        if self.max_batch_size < MAX_IMAGES_PER_REQUEST:
            raise SettingsError(f"'max_batch_size' must be >= {MAX_IMAGES_PER_REQUEST}: one request may ask for that many images")
        for name in ("batch_wait_timeout_s", "request_timeout_s", "cpus_per_replica", "ingress_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise SettingsError(f"'{name}' must be a number >= 0, got {value!r}")
        if self.request_timeout_s <= 0:
            raise SettingsError("'request_timeout_s' must be > 0")
        if self.gpus_per_replica is not None and (not isinstance(self.gpus_per_replica, (int, float)) or self.gpus_per_replica < 0):
            raise SettingsError(f"'gpus_per_replica' must be a number >= 0, got {self.gpus_per_replica!r}")
        if self.min_side % 8 or (self.max_side is not None and (self.max_side % 8 or self.max_side < self.min_side)):
            raise SettingsError("'min_side' and 'max_side' must be multiples of 8 with min_side <= max_side")
        if self.dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise SettingsError(f"'dtype' must be auto, fp16, bf16 or fp32, got {self.dtype!r}")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise SettingsError(f"'torch_threads' must be a positive integer, got {self.torch_threads!r}")
        if self.routing not in ROUTINGS:
            raise SettingsError(f"'routing' must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.preprocess not in ("resize", "pad"):
            raise SettingsError(f"'preprocess' must be 'resize' or 'pad', got {self.preprocess!r}")
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            raise SettingsError("'autoscaling' must be a mapping of Serve AutoscalingConfig fields")
        for prefix in self.allowed_image_prefixes:
            if prefix != "s3://":
                storage.parse_uri(prefix)  # a malformed prefix fails the deploy, not a request

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        """Settings from an application's ``args`` mapping; unknown keys are refused (typos must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise SettingsError(f"unknown serve app argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(args)
        if "allowed_image_prefixes" in values:
            prefixes = values["allowed_image_prefixes"]
            if isinstance(prefixes, str):
                prefixes = [p for p in prefixes.split(",") if p]
            values["allowed_image_prefixes"] = tuple(prefixes)
        try:
            return cls(**values)
        except TypeError as exc:  # a required argument missing
            raise SettingsError(str(exc)) from None

    def to_args(self) -> dict[str, Any]:
        """The args mapping that rebuilds these settings (passed to the deployments, which run elsewhere)."""
        data = asdict(self)
        data["allowed_image_prefixes"] = list(self.allowed_image_prefixes)
        return data

    # -- derived --------------------------------------------------------------------------------------------
    def generator_options(self, cluster_has_gpus: bool) -> dict[str, Any]:
        """``Deployment.options`` of the generator: replicas or autoscaling, GPUs, queue limits."""
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None else (1 if cluster_has_gpus else 0)
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.routing == "subject_affinity":
            from ray.serve.config import RequestRouterConfig

            # An import path: the router is built in the processes that hold a handle (the ingress), which import
            # it there. Affinity gives way to load beyond one batch of queue (see routing.py).
            options["request_router_config"] = RequestRouterConfig(
                request_router_class="pipelines.serve.routing.SubjectAffinityRouter",
                request_router_kwargs={"imbalance_slack": self.max_batch_size})
        if self.autoscaling:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.replicas
        return options

    def ingress_options(self) -> dict[str, Any]:
        return {
            "num_replicas": self.ingress_replicas,
            "ray_actor_options": {"num_cpus": self.ingress_cpus},
            "max_ongoing_requests": self.ingress_max_ongoing_requests,
        }

    def max_request_bytes(self) -> int:
        """The largest request body worth reading: every reference at its limit plus multipart framing."""
        return self.max_references * self.max_upload_bytes + 64 * 1024


def resolve_api_token(settings: ServeSettings, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token, if auth is on: ``api_token_file`` arg, else $DREAMCACHE_API_TOKEN_FILE, else
    $DREAMCACHE_API_TOKEN. A named file that cannot be read, or holds an empty token, is an error: a
    server that was meant to be protected must not start open."""
    environ = os.environ if environ is None else environ
    path = settings.api_token_file or environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"cannot read the API token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise SettingsError(f"the API token file {path} is empty")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    return token or None
