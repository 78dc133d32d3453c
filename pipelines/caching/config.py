"""Settings of a caching run (light: the command line builds its parser without Ray or torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dreamcache import storage
from dreamcache.errors import InvalidValue
from dreamcache.images import ImageLimits

from ..kernel import new_run_id

KIND = "caching"  # the manifest's folder: <out>/_manifests/caching/


class JobInputError(InvalidValue):
    """The job's inputs cannot be used at all (as opposed to one bad subject, which becomes an error row)."""


def _inside(child: str, parent: str) -> bool:
    child, parent = storage.parse_uri(child).uri.rstrip("/"), storage.parse_uri(parent).uri.rstrip("/")
    return child == parent or child.startswith(parent + "/")


@dataclass
class CachingJobConfig:
    out: str  # prefix (folder or s3://) for <subject_id>.safetensors and the manifest (_manifests/caching/)
    model: str  # diffusers SD folder, local or s3://
    images: str | None = None  # PREFIX/<subject_id>/<image files>
    catalog: str | None = None  # Parquet / CSV / JSONL with subject_id, image_uri (optional image_version)
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5  # fractional: on a 2-CPU machine two 1-CPU actors would starve the read tasks
    read_cpus: float = 0.5
    batch_size: int = 8  # subjects per actor batch
    # Batches in flight per actor: while one holds the model, another's input is prepared and the last one's
    # caches are serialized (the model part itself runs one batch at a time, see CacheActor). 2 beat 1 in steady
    # state on an H100 (52.7 vs 35.9 subjects/s) and on a 2-core CPU (39.3 vs 35.4): bench/caching_job.py.
    actor_concurrency: int = 2
    resolution: int | None = None
    preprocess: str = "resize"
    cache_prompt: str = ""
    seed: int = 0
    dtype: str = "auto"
    max_image_bytes: int = ImageLimits.max_bytes
    max_image_pixels: int = ImageLimits.max_pixels
    max_references: int = 16
    listing_shards: int | None = None  # parallel listing tasks (None: 16 on S3, 4 locally)
    # Custom Ray resources each caching actor needs, e.g. {"caching_node": 1}: the actors go to the nodes that
    # offer them (a GPU node group), the light stages anywhere.
    actor_resources: dict[str, float] | None = None
    wait_for_resources: bool = False  # an autoscaler adds nodes for the actors: do not fail fast without them
    run_id: str = field(default_factory=new_run_id)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.catalog is None):
            raise JobInputError("give exactly one of images (a prefix) or catalog (a file)")
        if self.actors < 1 or self.batch_size < 1 or self.actor_concurrency < 1:
            raise JobInputError("actors, batch_size and actor_concurrency must be >= 1")
        if self.preprocess not in ("resize", "pad"):
            raise JobInputError(f"preprocess must be resize or pad, got {self.preprocess!r}")
        try:
            for uri in (self.out, self.model, self.images or self.catalog):
                storage.parse_uri(uri)
            storage.validate_id(self.run_id, "run id")
        except InvalidValue as exc:
            raise JobInputError(str(exc)) from None
        # The job's own outputs under its inputs would come back as phantom subjects on the next run.
        if self.images is not None and _inside(self.out, self.images):
            raise JobInputError(f"--out {self.out} is inside --images {self.images}: choose an output prefix "
                                f"outside the reference images")

    def settings(self) -> str:
        """What besides sources and model determines a cache; part of the skip test."""
        return json.dumps({"resolution": self.resolution, "preprocess": self.preprocess,
                           "cache_prompt": self.cache_prompt, "seed": self.seed}, sort_keys=True)

    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
