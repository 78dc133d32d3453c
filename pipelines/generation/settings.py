"""Settings of a batch generation run: the job's config, what every actor renders with, and the seed lists.

Light on purpose (no Ray, torch or storage clients at import): the command line builds its parser from these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from dreamcache.cli_args import NOT_A_FLAG, option
from dreamcache.errors import InvalidValue
from dreamcache.options import (
    Guidance,
    guidance_field,
    guidance_scale_field,
    image_guidance_scale_field,
    side_field,
    steps_field,
)
from dreamcache.runtime import Dtype, device_field, dtype_field, model_field

from ..kernel.ray_runtime import wait_for_resources_field

ContactSheetMode = Literal["new", "all", "none"]


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidValue(f"a seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


# Seeds per prompt: the list travels with every plan task, so a range such as 0-1000000000 is refused, not
# expanded; more images per prompt than this go in an explicit plan, which the cluster reads in pieces.
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5"`` or ranges ``"0-3"`` (inclusive), mixed: ``"0-3,10"``; at most :data:`MAX_SEEDS`."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep else [int(part)]
        except ValueError:
            raise InvalidValue(f"bad seed list {text!r}: use numbers and ranges like 0,1,5 or 0-3") from None
        if len(seeds) + len(values) > MAX_SEEDS:
            raise InvalidValue(f"seed list {text!r} names more than {MAX_SEEDS} seeds per prompt; "
                               "use an explicit plan (--plan) for more")
        seeds.extend(check_seed(v) for v in values)
    if not seeds:
        raise InvalidValue(f"no seeds in {text!r}")
    return list(dict.fromkeys(seeds))


@dataclass
class GenerationJobConfig:
    """Everything a generation run needs. ``prompts``/``plan``/``subjects`` take a URI or the values themselves
    (what a program such as an evaluation job passes). Each option field is also the job's command-line option
    of that name (dreamcache.cli_args; pipelines.generation.args adds --subjects-file)."""

    model: str = model_field()
    adapter: str = option(help="adapter safetensors file (path or s3:// URI)")
    caches: str = option(help="a caching job's output prefix (its manifest is read), a prefix of "
                              "<subject_id>.safetensors files, or a single-file caching manifest (.parquet)")
    prompts: str | Sequence[str | Mapping[str, Any]] | None = option(
        None, "prompts file: one prompt per line, or JSONL with prompt, negative_prompt, guidance_scale, "
              "image_guidance_scale", one_of="what")
    plan: str | Sequence[Mapping[str, Any]] | None = option(
        None, "explicit plan (Parquet, CSV or JSONL): subject_id, prompt, [seed, negative_prompt, guidance_scale, "
              "image_guidance_scale]", one_of="what")
    subjects: Sequence[str] | None = option(None, "comma-separated subject ids (default: every subject of --caches)")
    seeds: Sequence[int] = option((0,), "seeds per prompt: 0,1,5 or 0-3", parse=parse_seeds)
    out: str = option("dreamcache-generations", "output folder or s3:// prefix")
    steps: int = steps_field()
    # One vocabulary with `dreamcache generate`: --guidance is the mode, --guidance-scale the text scale.
    guidance_scale: float = guidance_scale_field()
    image_guidance_scale: float = image_guidance_scale_field()
    guidance: Guidance = guidance_field()
    negative_prompt: str | None = option(None, "negative prompt for prompts that do not name one")
    height: int | None = side_field("height")
    width: int | None = side_field("width")
    batch_size: int = option(8)
    actors: int = option(1, "actor pool size (the minimum when --max-actors is set)")
    max_actors: int | None = option(None, "autoscale the actor pool up to this many")
    gpus_per_actor: float | None = option(None, "default: 1 if the cluster has GPUs now, else 0")
    # Without a GPU 0.5, so two CPU actors fit on 2 cores.
    cpus_per_actor: float | None = option(None, "default: 1 with a GPU, 0.5 without")
    wait_for_resources: bool = wait_for_resources_field()
    device: str = device_field()
    dtype: Dtype = dtype_field()
    torch_threads: int | None = option(None, "CPU threads per actor (default: Ray's)")
    cache_lru_size: int = field(default=32, metadata=NOT_A_FLAG)  # caches kept per actor across batches
    contact_sheet: ContactSheetMode = option("new", "sheets for subjects touched this run (new), every subject "
                                                    "(all), or none")
    contact_sheet_cell: int = option(160)
    contact_sheet_max_subjects: int = field(default=1000, metadata=NOT_A_FLAG)
    run_id: str | None = option(None, "name of this run (default: UTC time + random suffix)")

    def validate(self) -> None:
        if (self.prompts is None) == (self.plan is None):
            raise InvalidValue("give exactly one of prompts (with subjects x seeds) or an explicit plan")
        for name in ("steps", "batch_size", "actors", "cache_lru_size", "contact_sheet_cell"):
            if int(getattr(self, name)) < 1:
                raise InvalidValue(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise InvalidValue(f"max_actors ({self.max_actors}) must be >= actors ({self.actors})")
        for name in ("guidance", "dtype", "contact_sheet"):  # programs pass them unchecked by the parser
            allowed = get_args(get_type_hints(GenerationJobConfig)[name])
            if getattr(self, name) not in allowed:
                raise InvalidValue(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise InvalidValue(f"{name} must be a positive multiple of 8, got {value}")
        if not list(self.seeds):
            raise InvalidValue("at least one seed is required")
        for seed in self.seeds:
            check_seed(seed)
        if self.run_id is not None:
            from dreamcache import storage  # here, not at the top: it loads the S3 client library

            storage.validate_id(self.run_id, "run id")


@dataclass(frozen=True)
class RenderSettings:
    """What every actor needs to render: the same for all rows of a run."""

    model: str
    adapter: str
    device: str
    dtype: str
    steps: int
    guidance: str
    height: int | None
    width: int | None
    torch_threads: int | None = None
    cache_lru_size: int = 32
