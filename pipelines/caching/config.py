"""Settings of a caching run (light: the command line builds its parser without Ray or torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dreamcache import storage
from dreamcache.cli_args import NOT_A_FLAG, option
from dreamcache.errors import InvalidValue
from dreamcache.images import ImageLimits, PreprocessMode
from dreamcache.options import cache_prompt_field, preprocess_field, resolution_field
from dreamcache.runtime import Dtype, dtype_field, model_field

from ..kernel import new_run_id
from ..kernel.ray_runtime import wait_for_resources_field

KIND = "caching"  # the manifest's folder: <out>/_manifests/caching/


class JobInputError(InvalidValue):
    """The job's inputs cannot be used at all (as opposed to one bad subject, which becomes an error row)."""


def _inside(child: str, parent: str) -> bool:
    child, parent = storage.parse_uri(child).uri.rstrip("/"), storage.parse_uri(parent).uri.rstrip("/")
    return child == parent or child.startswith(parent + "/")


@dataclass
class CachingJobConfig:
    """A caching run; each field is also the job's command-line option of that name (dreamcache.cli_args)."""

    out: str = option(help="prefix for <subject_id>.safetensors and _manifests/caching/")
    model: str = model_field()
    images: str | None = option(None, "prefix laid out PREFIX/<subject_id>/<image files> (path or s3://)",
                                one_of="source")
    catalog: str | None = option(None, "Parquet, CSV or JSONL file with subject_id, image_uri columns (and "
                                       "optionally image_version, e.g. ETags from an inventory)", one_of="source")
    actors: int = option(1, "size of the caching actor pool")
    gpus_per_actor: float = option(0.0, "0 = CPU actors")
    # Fractional: on a 2-CPU machine two 1-CPU actors would starve the read tasks.
    cpus_per_actor: float = option(0.5)
    read_cpus: float = field(default=0.5, metadata=NOT_A_FLAG)
    batch_size: int = option(8, "subjects per actor batch (and images per UNet call)")
    # Batches in flight per actor: while one holds the model, another's input is prepared and the last one's
    # caches are serialized (the model part itself runs one batch at a time, see CacheActor). 2 beat 1 in steady
    # state on an H100 (52.7 vs 35.9 subjects/s) and on a 2-core CPU (39.3 vs 35.4): bench/caching_job.py.
    actor_concurrency: int = option(2, "batches in flight per actor: input prep and serialization overlap the GPU work")
    resolution: int | None = resolution_field()
    preprocess: PreprocessMode = preprocess_field()
    cache_prompt: str = cache_prompt_field()
    seed: int = option(0)
    dtype: Dtype = dtype_field()
    max_image_bytes: int = option(ImageLimits.max_bytes)
    max_image_pixels: int = option(ImageLimits.max_pixels)
    max_references: int = option(16)
    listing_shards: int | None = option(None, "parallel listing tasks (default: 16 on S3, 4 locally)")
    # Custom Ray resources each caching actor needs: the actors go to the nodes that offer them (a GPU node
    # group), the light stages anywhere.
    actor_resources: dict[str, float] | None = option(None, 'custom Ray resources per caching actor, e.g. '
                                                            '\'{"caching_node": 1}\'')
    wait_for_resources: bool = wait_for_resources_field()
    run_id: str = field(default_factory=new_run_id, metadata=NOT_A_FLAG)

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
