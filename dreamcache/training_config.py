"""The settings of adapter training: ``TrainingConfig`` and the reference augmentation it carries.

Light on purpose (no torch, numpy or PIL): the training command line is derived from these fields
(``dreamcache.cli_args``), so ``--help`` imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .cli_args import NOT_A_FLAG, option
from .errors import InvalidValue

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LinearCatInit = Literal["default", "identity"]  # fresh init of linear_cat: the official default, or identity (A7)
# eps: the plain eps-MSE of the official run. x0: the same error measured on the clean latents, i.e. each sample's
# eps-MSE times (1 - abar) / abar (capped at max_loss_weight). eps-MSE weights a wrong x0 by abar / (1 - abar),
# about 1/100 at t ~ 900, where only the caption and the cache know what the image is.
LossWeighting = Literal["eps", "x0"]


@dataclass(frozen=True)
class ReferenceAugment:
    """The official reference augmentation; every probability can be set to 0 to switch a step off."""

    min_width_fraction: float = 0.7  # RandomResizeForeground(min_pct_area=0.7): width in [0.7 W, W]
    flip_p: float = 0.5
    jitter_p: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    erase_p: float = 0.4
    erase_area: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        if not 0 < self.min_width_fraction <= 1:
            raise InvalidValue(f"min_width_fraction must be in (0, 1], got {self.min_width_fraction}")
        for name in ("flip_p", "jitter_p", "erase_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidValue(f"{name} must be a probability, got {getattr(self, name)}")


@dataclass
class TrainingConfig:
    """Everything a training run needs; the job's flags are these fields (those not marked NOT_A_FLAG)."""

    model: str = option(help="diffusers Stable Diffusion folder (path or s3://)")
    data: str = option(help="triplet Parquet file, folder or s3:// prefix")
    out: str = option(help="folder or s3:// prefix for checkpoints/ and adapter.safetensors")
    steps: int = option(help="optimizer steps")
    batch_size: int = option(8, "samples per worker and micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-5)
    weight_decay: float = option(0.01)
    resolution: int | None = option(None, "training image size (default: the model's)")
    # auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU
    mixed_precision: MixedPrecision = option("auto")
    gradient_checkpointing: bool = option(False)
    checkpoint_every: int = option(500, "steps between checkpoints")
    keep_checkpoints: int = option(2)
    resume: str = option("auto", "auto (last checkpoint of this --out), never, or a checkpoint URI")
    seed: int = option(0)
    caption_dropout: float = option(0.07)
    augment: ReferenceAugment = field(default_factory=ReferenceAugment, metadata=NOT_A_FLAG)
    init_adapter: str | None = option(None, "start from this adapter file instead of a fresh initialisation")
    adapter_init: LinearCatInit = option("default", "fresh init of linear_cat: the official default, or identity "
                                                    "(deviation A7)")
    save_dtype: Literal["fp16", "fp32"] = option("fp16", "of the final adapter file (checkpoints are fp32)")
    log_every: int = option(10)
    device: str = field(default="auto", metadata=NOT_A_FLAG)  # the job sets it (Ray Train's device per worker)
    # text context of the on-the-fly caching pass ("" as the official training)
    cache_prompt: str = field(default="", metadata=NOT_A_FLAG)
    # DataLoader processes decoding and augmenting images (local data path); 0: in the training process
    data_workers: int = field(default=2, metadata=NOT_A_FLAG)
    max_grad_norm: float | None = option(None, "clip gradients (the official run does not)")
    # Training timesteps are drawn from [low, high) (None: every timestep, as the official run); an experiment
    # knob of the toy world (issue 12): which part of the noise schedule carries a subject's identity.
    timestep_range: tuple[int, int] | None = field(default=None, metadata=NOT_A_FLAG)
    loss_weighting: LossWeighting = option("eps", "eps (the official eps-MSE) or x0 (the error on the clean "
                                                  "latents, capped at --max-loss-weight)")
    max_loss_weight: float = option(100.0, "cap of the x0 weighting's per-sample weight (1 - abar) / abar")

    def validate(self) -> None:
        counts = ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in counts:
            if getattr(self, name) < 1:
                raise InvalidValue(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < 0:
            raise InvalidValue(f"data_workers must be >= 0, got {self.data_workers}")
        if not self.lr > 0:
            raise InvalidValue(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.caption_dropout <= 1:
            raise InvalidValue(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise InvalidValue(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.save_dtype not in ("fp16", "fp32"):
            raise InvalidValue(f"save_dtype must be fp16 or fp32, got {self.save_dtype!r}")
        if self.loss_weighting not in ("eps", "x0"):
            raise InvalidValue(f"loss_weighting must be eps or x0, got {self.loss_weighting!r}")
        if not self.max_loss_weight > 0:
            raise InvalidValue(f"max_loss_weight must be > 0, got {self.max_loss_weight}")
        if self.timestep_range is not None and not (
                len(self.timestep_range) == 2 and 0 <= self.timestep_range[0] < self.timestep_range[1]):
            raise InvalidValue(f"timestep_range must be (low, high) with 0 <= low < high, got {self.timestep_range}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise InvalidValue(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def summary(self) -> dict:
        data = asdict(self)
        data["augment"] = asdict(self.augment)
        return data
