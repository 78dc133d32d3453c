"""What travels over HTTP and between the ingress and the generator replicas.

The request bodies are pydantic models, so FastAPI answers malformed or out-of-range input with a 422 that names
the field and publishes the limits in the OpenAPI schema at /docs. Between deployments, plain dataclasses:
a replica answers a :class:`Failure` (status, message, field) rather than raising, so the ingress never has to
guess an HTTP status from a remote exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamcache import storage

from .settings import MAX_IMAGES_PER_REQUEST

if TYPE_CHECKING:  # the ingress imports this module and must stay free of torch and diffusers
    from dreamcache.cache_info import CacheInfo
    from dreamcache.images import ImageDecodeError

MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000


class GenerateRequest(BaseModel):
    """POST /v1/generate."""

    model_config = ConfigDict(extra="forbid")

    subject_id: str = Field(min_length=1, max_length=128, description="a subject registered with POST /v1/subjects")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    # allow_inf_nan=False: JSON's NaN/Infinity extensions would pass ge/le (NaN compares false) into the sampler.
    guidance_scale: float = Field(default=7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    image_guidance_scale: float = Field(default=0.4, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    guidance: Literal["compositional", "joint"] = "compositional"
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="image i uses seed + i; omitted: random")
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8,
                               description="pixels; default: the model's resolution; the model's limits apply")
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8,
                              description="pixels; default: the model's resolution; the model's limits apply")


# A grid is answered by one request whose cells all run on the serving replicas: a bound keeps one client from
# holding every replica for minutes. Larger grids belong to the batch generation job (`dreamcache generate-batch`),
# which writes images and a manifest to object storage instead of holding an HTTP stream open.
MAX_GRID_SUBJECTS = 16
MAX_GRID_PROMPTS = 8
MAX_GRID_SEEDS = 8
MAX_GRID_CELLS = 64
GRID_AXES = ("subject_ids", "prompts", "seeds")
BATCH_JOB_HINT = "use the batch generation job (dreamcache generate-batch) for larger grids"
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
SubjectId = Annotated[str, Field(min_length=1, max_length=128)]


class GridPrompt(BaseModel):
    """One prompt of a grid; unset fields take the grid's value."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    image_guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)


class GridRequest(BaseModel):
    """POST /v1/grids: every subject x every prompt x every seed, one image per cell.

    The axis limits (maxItems) and ``x-max-cells`` are enforced: a grid above them is answered 413."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"x-max-cells": MAX_GRID_CELLS})

    subject_ids: list[SubjectId] = Field(min_length=1, max_length=MAX_GRID_SUBJECTS)
    prompts: list[GridPrompt] = Field(min_length=1, max_length=MAX_GRID_PROMPTS)
    seeds: list[Seed] | None = Field(default=None, min_length=1, max_length=MAX_GRID_SEEDS,
                                     description="omitted: one random seed for the whole grid")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    image_guidance_scale: float = Field(default=0.4, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    guidance: Literal["compositional", "joint"] = "compositional"
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)

    def cells(self) -> int:
        return len(self.subject_ids) * len(self.prompts) * len(self.seeds or [0])


def grid_too_large(errors: list[dict[str, Any]]) -> str | None:
    """The 413 message when a grid's validation errors include an axis over its limit (else None): a grid too
    large is not malformed, it is the wrong tool, and the answer says which one to use."""
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "too_long" and len(loc) == 2 and loc[0] == "body" and loc[1] in GRID_AXES:
            limit = {"subject_ids": MAX_GRID_SUBJECTS, "prompts": MAX_GRID_PROMPTS, "seeds": MAX_GRID_SEEDS}[loc[1]]
            return f"a grid takes at most {limit} {loc[1]}; {BATCH_JOB_HINT}"
    return None


class SubjectFromUris(BaseModel):
    """POST /v1/subjects with a JSON body: reference images named by URI (s3:// by default)."""

    model_config = ConfigDict(extra="forbid")

    subject_id: str = Field(min_length=1, max_length=128)
    image_uris: list[str] = Field(min_length=1)


# -- between the ingress and the generator replicas ---------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """A request the replica could not serve, with the HTTP status the ingress answers."""

    status: int
    message: str
    field: str | None = None  # the request field at fault (a 422 names it)


@dataclass(frozen=True)
class Upload:
    """One reference image as received: the request field it came from, a name for messages, its bytes."""

    field: str
    source: str
    data: bytes


@dataclass(frozen=True)
class GenerateJob:
    """One generate request, fully resolved (seed and size chosen) by the ingress."""

    subject_id: str
    prompt: str
    negative_prompt: str | None
    num_images: int
    steps: int
    guidance_scale: float
    image_guidance_scale: float
    guidance: str
    seed: int
    height: int
    width: int
    deadline: float  # time.time() after which nobody waits for the answer

    def parameters(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("prompt", "negative_prompt", "num_images", "steps", "guidance_scale",
                                              "image_guidance_scale", "guidance", "seed", "height", "width")}

    def batch_key(self) -> tuple:
        """Requests with the same key can share one pipeline call (scalars of the call must agree)."""
        return (self.steps, self.guidance_scale, self.image_guidance_scale, self.guidance, self.height, self.width)


@dataclass(frozen=True)
class GenerateResult:
    pngs: list[bytes]
    replica: str
    cache: str  # "hit": the subject was on the replica; "loaded": read from the store for this request
    batch_images: int  # images in the UNet batch this request ran in
    batch_subjects: int  # distinct subjects in that batch
    seconds: float  # time in the pipeline call


@dataclass(frozen=True)
class Progress:
    """An event of POST /v1/generate as an event stream: the request is queued on ``replica`` (step 0), or its
    UNet batch finished denoising step ``step`` of ``steps``."""

    step: int
    steps: int
    replica: str = ""


@dataclass(frozen=True)
class SubjectOutcome:
    """A subject registered (``created``) or looked up, and the replica that answered."""

    created: bool  # False: the same images were already cached (nothing was computed), or a lookup
    metadata: dict[str, Any] = field(default_factory=dict)
    replica: str = ""


@dataclass(frozen=True)
class ModelInfo:
    base_model: str
    default_resolution: int
    replica: str
    device: str
    dtype: str


def subject_metadata(subject_id: str, info: "CacheInfo", uri: str, nbytes: int) -> dict[str, Any]:
    return {
        "subject_id": subject_id,
        "num_references": len(info.source_hashes),  # one hash per reference (checked when a cache is read)
        "source_hashes": list(info.source_hashes),
        "base_model": info.base_model,
        "resolution": list(info.resolution),
        "preprocess": info.preprocess,
        "cache_prompt": info.cache_prompt,
        "seed": info.seed,
        "cache_uri": uri,
        "bytes": nbytes,
    }


def image_failure(exc: "ImageDecodeError", field_name: str) -> Failure:
    """415 for what is not an image (or an image format we do not take), 413 for too many bytes, 422 otherwise."""
    reason = exc.reason
    if reason.startswith("not an image") or reason.startswith("format "):
        status = 415
    elif "bytes exceeds the limit" in reason:
        status = 413
    else:
        status = 422
    return Failure(status, str(exc), field_name)


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors without what the client sent (``input``, ``ctx``, ``url``): an echoed NaN or bytes
    value cannot be encoded as JSON (that made the 422 a 500), and echoing input is not needed to name the field."""
    return [{"loc": [str(part) if not isinstance(part, int) else part for part in error.get("loc", ())],
             "msg": str(error.get("msg", "invalid value")), "type": str(error.get("type", "value_error"))}
            for error in errors]


def check_image_uri(uri: str, allowed_prefixes: tuple[str, ...]) -> str:
    """The canonical form of a client-supplied image URI, if it lies under an allowed prefix.

    Clients must not make the server read arbitrary files (its own caches, /etc): local paths are normalised
    (``..`` resolved) before the prefix check, S3 keys with ``..`` segments are refused.
    """
    if not allowed_prefixes:
        raise ValueError("image URIs are not accepted by this server; upload the images as multipart/form-data")
    location = storage.parse_uri(uri)  # ValueError for an unsupported scheme
    if location.scheme == "s3" and ".." in location.path.split("/"):
        raise ValueError(f"{uri!r}: '..' is not allowed in an S3 key")
    canonical = location.uri
    for prefix in allowed_prefixes:
        if prefix == "s3://" and location.scheme == "s3":
            return canonical
        if prefix != "s3://":
            base = storage.parse_uri(prefix).uri.rstrip("/") + "/"
            if canonical.startswith(base):
                return canonical
    raise ValueError(f"{uri!r} is not under an allowed image prefix ({', '.join(allowed_prefixes)})")
