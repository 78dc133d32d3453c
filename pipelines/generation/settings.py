"""Settings of a batch generation run: the job's config, what every actor renders with, and the seed lists.

Light on purpose (no Ray, torch or storage clients at import): the command line builds its parser from these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dreamcache.errors import InvalidValue

ContactSheetMode = Literal["new", "all", "none"]


@dataclass
class GenerationJobConfig:
    """Everything a generation run needs. ``prompts``/``plan``/``subjects`` take a URI or the values themselves
    (what a program such as an evaluation job passes)."""

    model: str  # diffusers SD folder: local path or s3:// prefix
    adapter: str  # adapter safetensors file
    caches: str  # a cache prefix (<subject_id>.safetensors files) or a caching manifest (*.parquet)
    prompts: str | Sequence[str | Mapping[str, Any]] | None = None  # text/JSONL file, or the prompts
    plan: str | Sequence[Mapping[str, Any]] | None = None  # explicit rows (Parquet/CSV/JSONL file, or dicts)
    subjects: Sequence[str] | None = None  # only these subjects (default: every subject of ``caches``)
    seeds: Sequence[int] = (0,)
    out: str = "dreamcache-generations"
    steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 0.4
    guidance: Literal["compositional", "joint"] = "compositional"
    negative_prompt: str | None = None  # default for prompts that do not name one
    height: int | None = None  # None: the model's default resolution
    width: int | None = None
    batch_size: int = 8
    actors: int = 1  # actor pool size (the minimum when max_actors is set)
    max_actors: int | None = None  # autoscale the pool up to this many actors
    gpus_per_actor: float | None = None  # None: 1 if the Ray cluster has GPUs now, else 0
    cpus_per_actor: float | None = None  # None: 1 with a GPU, 0.5 without (two CPU actors fit on 2 cores)
    wait_for_resources: bool = False  # an autoscaler adds GPU nodes: do not fail fast without them
    device: str = "auto"  # auto: cuda when the actor has a GPU
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    torch_threads: int | None = None  # CPU threads per actor (None: Ray's default)
    cache_lru_size: int = 32  # caches kept per actor across batches
    contact_sheet: ContactSheetMode = "new"  # subjects with rows rendered or failed this run / all / none
    contact_sheet_cell: int = 160
    contact_sheet_max_subjects: int = 1000
    run_id: str | None = None

    def validate(self) -> None:
        if (self.prompts is None) == (self.plan is None):
            raise InvalidValue("give exactly one of prompts (with subjects x seeds) or an explicit plan")
        for name in ("steps", "batch_size", "actors", "cache_lru_size", "contact_sheet_cell"):
            if int(getattr(self, name)) < 1:
                raise InvalidValue(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise InvalidValue(f"max_actors ({self.max_actors}) must be >= actors ({self.actors})")
        if self.guidance not in ("compositional", "joint"):
            raise InvalidValue(f"guidance must be 'compositional' or 'joint', got {self.guidance!r}")
        if self.dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise InvalidValue(f"dtype must be auto, fp16, bf16 or fp32, got {self.dtype!r}")
        if self.contact_sheet not in ("new", "all", "none"):
            raise InvalidValue(f"contact_sheet must be new, all or none, got {self.contact_sheet!r}")
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


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidValue(f"a seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5"`` or ranges ``"0-3"`` (inclusive), mixed: ``"0-3,10"``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep else [int(part)]
        except ValueError:
            raise InvalidValue(f"bad seed list {text!r}: use numbers and ranges like 0,1,5 or 0-3") from None
        seeds.extend(check_seed(v) for v in values)
    if not seeds:
        raise InvalidValue(f"no seeds in {text!r}")
    return list(dict.fromkeys(seeds))
