"""Settings of the Serve app: one pydantic model of the application's ``args`` (serve config, RayService
``serveConfigV2``, or ``dreamcache serve``), checked once when the app is built so a typo fails the deploy,
not the first request. Serve's typed application builder validates the args into it (``build_app``'s type hint).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from dreamcache import storage
from dreamcache.cli_args import comma_list
from dreamcache.errors import InvalidValue
from dreamcache.images import PreprocessMode
from dreamcache.runtime import DEVICE_HELP, DTYPE_HELP, MODEL_HELP, Dtype

logger = logging.getLogger(__name__)

TOKEN_ENV = "DREAMCACHE_API_TOKEN"
TOKEN_FILE_ENV = "DREAMCACHE_API_TOKEN_FILE"

# Hard API limits (the OpenAPI schema states them); the settings below can only tighten the batch side.
MAX_IMAGES_PER_REQUEST = 8
# The values of ServeSettings.routing (pipelines/serve/routing.py says what each means).
Routing = Literal["multiplexed", "subject_affinity"]
ROUTINGS: tuple[str, ...] = get_args(Routing)


class SettingsError(InvalidValue):
    """An application argument is missing, unknown or out of range."""


def _split_commas(value: Any) -> Any:
    # `--allowed-image-prefixes s3://a/,s3://b/` (or a config's one string) arrives as one text.
    return comma_list(value) if isinstance(value, str) else value


# Strict: pydantic's lax mode reads True as 1 and "2" as 2; a YAML `yes` where a count belongs is a typo, not one
# replica. A float field still takes an int.
Count = Annotated[int, Strict(), Field(ge=1)]
Amount = Annotated[float, Strict(), Field(ge=0)]


class ServeSettings(BaseModel):
    # Unknown keys are refused (typos must not pass); frozen: checked once, so nothing may change them after.
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Each field is also a `dreamcache serve` flag (--field-name, its description the help: pipelines/cli.py).
    # -- what to serve --------------------------------------------------------------------------------------
    model: str = Field(description=MODEL_HELP)
    caches: str = Field(description="cache store: folder or s3:// prefix of <subject_id>.safetensors")
    adapter: str | None = Field(None, description="adapter safetensors file (path or s3:// URI)")
    device: str = Field("auto", description=DEVICE_HELP)
    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    torch_threads: Count | None = Field(None, description="CPU replicas: intra-op threads (default: torch's)")

    # -- generator replicas (GPU) ---------------------------------------------------------------------------
    replicas: Count = Field(1, description="generator replicas (a fixed count, unless autoscaling is given)")
    autoscaling: dict[str, Any] | None = Field(None, description="Serve AutoscalingConfig of the generator, e.g. "
                                                                 '\'{"min_replicas": 1, "max_replicas": 4}\'')
    gpus_per_replica: Amount | None = Field(None, description="default: 1 when the Ray cluster has GPUs, else 0")
    cpus_per_replica: Amount = 1.0
    # >= 2x the batch, so one batch fills while another runs.
    max_ongoing_requests: Count = Field(16, description="requests in flight per generator replica")
    max_queued_requests: Annotated[int, Strict()] = Field(
        64, description="requests waiting for a replica, per ingress replica; beyond it 503 + Retry-After "
                        "(-1: unbounded, Serve's value)")
    # Requests of different subjects share a batch; one request may ask for the API's maximum.
    max_batch_size: Annotated[int, Strict(), Field(ge=MAX_IMAGES_PER_REQUEST)] = Field(
        8, description="images per UNet batch")
    batch_wait_timeout_s: Amount = Field(0.02, description="how long a batch waits to fill once its first "
                                                           "request arrived, seconds")
    max_caches_per_replica: Count = Field(64, description="subject caches kept on each replica's device (LRU)")
    # The default is the faster of the two in bench/results/2026-12-02-serve-routing-cpu.md.
    # Limitation of "multiplexed": DELETE /v1/subjects/{id} frees the cache's memory on every replica at once, but
    # its slot in Serve's multiplexer LRU stays until the LRU evicts it (Ray 2.60 has no public call that drops one
    # model id: the LRU is the private `_ModelMultiplexWrapper.models`). Until then the slot counts against
    # max_caches_per_replica, and the replica still reports the id to the routers (a request for the deleted
    # subject is still routed there, and answered 404). "subject_affinity" frees the slot at once.
    routing: Routing = Field("subject_affinity", description="how a request reaches a replica holding its "
                                                             "subject (pipelines/serve/routing.py): Serve's "
                                                             "request router API, or multiplexed model ids")

    # -- ingress (CPU) --------------------------------------------------------------------------------------
    ingress_replicas: Count = 1
    ingress_cpus: Amount = 0.5
    ingress_max_ongoing_requests: Count = 512
    grid_max_in_flight: Count = Field(32, description="cells of one POST /v1/grids waiting on the generator "
                                                      "replicas at once")

    # -- request limits -------------------------------------------------------------------------------------
    request_timeout_s: Annotated[float, Strict(), Field(gt=0)] = Field(
        300.0, description="server-side deadline per request, seconds (504 after)")
    retry_after_s: Count = Field(5, description="the Retry-After of a 503, seconds")
    max_upload_bytes: Count = Field(20 * 2**20, description="per reference image")
    max_references: Count = Field(8, description="images per subject")
    max_pixels: Count = Field(40_000_000, description="per reference image, checked before decoding")
    # Generated image sides, pixels (multiples of 8).
    min_side: Annotated[Count, Field(multiple_of=8)] = Field(64, description="smallest generated image side")
    max_side: Annotated[Count, Field(multiple_of=8)] | None = Field(
        None, description="largest generated image side (default: twice the model's resolution)")
    # Empty by default (uploads only): a server reads what its credentials reach, so any allowed prefix lets
    # clients make it read objects there; name one explicitly, e.g. an uploads prefix.
    allowed_image_prefixes: Annotated[tuple[str, ...], BeforeValidator(_split_commas)] = Field(
        (), description="comma-separated prefixes that JSON image URIs may name, e.g. s3://bucket/uploads/ "
                        "(default: none, uploads only)")

    # -- how new subjects are cached (as the caching job does) -----------------------------------------------
    resolution: int | None = Field(None, description="reference size in pixels (default: the model's)")
    preprocess: PreprocessMode = "resize"
    cache_prompt: str = ""
    cache_seed: int = 0

    # -- auth -----------------------------------------------------------------------------------------------
    api_token_file: str | None = Field(None, description=f"bearer token file (default: ${TOKEN_FILE_ENV}, else "
                                                         f"${TOKEN_ENV}; none: no auth)")

    @field_validator("model", "caches")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("required (a path or s3:// URI)")
        return value

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, value: int) -> int:
        if value < 1 and value != -1:
            raise ValueError("must be a positive integer or -1 (unbounded)")
        return value

    @field_validator("allowed_image_prefixes")
    @classmethod
    def _prefixes_parse(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            if prefix != "s3://":
                storage.parse_uri(prefix)  # a malformed prefix fails the deploy, not a request
        return prefixes

    @field_validator("max_side")
    @classmethod
    def _sides_ordered(cls, value: int | None, info: ValidationInfo) -> int | None:
        min_side = info.data.get("min_side")  # declared before max_side; absent if it failed its own checks
        if value is not None and min_side is not None and value < min_side:
            raise ValueError(f"must be >= min_side ({min_side})")
        return value

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ServeSettings:
        """pydantic's validation, its errors as one SettingsError line naming each field: Serve's typed builder
        calls this on the app's args, so `serve deploy`, a RayService and ``dreamcache serve`` fail alike."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None

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


def _one_line(exc: ValidationError) -> str:
    """``'field': what is wrong, got value`` for each error, unknown keys together with the known ones."""
    problems, unknown = [], []
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            unknown.append(name)
        elif error["type"] == "missing":
            problems.append(f"'{name}': required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"'{name}': {message}, got {error['input']!r}" if name else message)
    if unknown:
        problems.append(f"unknown serve app argument(s): {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(ServeSettings.model_fields))}")
    return "; ".join(problems)


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
