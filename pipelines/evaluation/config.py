"""Settings of a DreamBench evaluation run (``EvaluationConfig``): light on purpose, no Ray, torch or diffusers,
since the job's command line (``jobs/evaluate.py``, ``dreamcache evaluate``) is derived from these fields
(``dreamcache.cli_args``) and ``--help`` must stay fast."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dreamcache import storage
from dreamcache.cli_args import comma_list, option
from dreamcache.dreambench import (
    IMAGES_PER_PROMPT,
    OFFICIAL_NEGATIVE_PROMPT,
    PROMPTS_PER_SUBJECT,
    SUBJECTS,
    check_subjects,
)
from dreamcache.errors import InvalidValue
from dreamcache.options import (
    Guidance,
    cache_prompt_field,
    guidance_field,
    guidance_scale_field,
    image_guidance_scale_field,
    side_field,
    steps_field,
)
from dreamcache.runtime import Dtype, dtype_field, model_field


class EvaluationInputError(InvalidValue):
    """The dataset, references or settings cannot make a benchmark run."""


@dataclass
class EvaluationConfig:
    """One benchmark run; each field is also the job's command-line option of that name."""

    dataset: str = option(help="DreamBooth dataset folder: <subject>/<NN>.jpg (path or s3://)")
    model: str = model_field()
    adapter: str = option(help="adapter safetensors file")
    out: str = option(help="output folder or s3:// prefix")
    dino: str = option(help="transformers DINO ViT-S/16 folder, facebook/dino-vits16 (path or s3://)")
    clip: str = option(help="transformers CLIP ViT-B/32 folder, openai/clip-vit-base-patch32 (path or s3://)")
    references: str | None = option(None, "reference images <subject>/<image> or <subject>.<ext> (e.g. background "
                                          "removed); default: the keep-list image of the dataset")
    caches: str | None = option(None, "precomputed caches (prefix or caching manifest): skip the caching stage")
    subjects: Sequence[str] | None = option(None, "comma-separated subset of the 30 subjects", parse=comma_list)
    prompts_per_subject: int = option(PROMPTS_PER_SUBJECT, f"below {PROMPTS_PER_SUBJECT}: a smoke run")
    images_per_prompt: int = option(IMAGES_PER_PROMPT)
    seed: int = option(0, "image i of a prompt uses seed + i")
    steps: int = steps_field()
    guidance_scale: float = guidance_scale_field()
    image_guidance_scale: float = image_guidance_scale_field()  # 0.4: the official DreamBench setting (spec 4.2)
    guidance: Guidance = guidance_field()
    negative_prompt: str = option(OFFICIAL_NEGATIVE_PROMPT, "the official sampler's by default")
    cache_prompt: str = cache_prompt_field()  # "" (paper, training) or the negative prompt (ambiguity A2)
    height: int | None = side_field("height")
    width: int | None = side_field("width")
    batch_size: int = option(8)
    actors: int = option(1, "actors per stage (caching, generation, scoring)")
    gpus_per_actor: float | None = option(None, "default: 1 if the cluster has GPUs, else 0 (generation, scoring)")
    cpus_per_actor: float | None = option(None, "default: 1 with a GPU, else 0.5")
    dtype: Dtype = dtype_field()
    score_batch_size: int = option(32)
    backbone: Literal["SD 2.1", "SD 1.5"] | None = option(None, "paper row to compare with (default: detected "
                                                                "from the model config)")
    run_id: str | None = option(None, "the generation run's id (default: a new one)")

    def validate(self) -> None:
        if self.subjects is not None:
            check_subjects(list(self.subjects))
        if not 1 <= self.prompts_per_subject <= PROMPTS_PER_SUBJECT:
            raise EvaluationInputError(f"prompts_per_subject must be 1..{PROMPTS_PER_SUBJECT}")
        for name in ("images_per_prompt", "steps", "batch_size", "actors", "score_batch_size"):
            if getattr(self, name) < 1:
                raise EvaluationInputError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def subject_list(self) -> list[str]:
        return list(self.subjects) if self.subjects is not None else list(SUBJECTS)

    def uri(self, *parts: str) -> str:
        return storage.join_uri(self.out, *parts)
