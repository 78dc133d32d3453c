"""What it takes to run the method somewhere: one model spec and the one loader that turns it into a ready
pipeline, with the device and dtype pickers every entry point (CLI, jobs, Serve, benchmarks) shares.

The spec holds strings and numbers only, so it pickles into Ray tasks and actors; torch is imported when a
picker or the loader runs, not when this module is imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from .cli_args import NOT_A_FLAG, option
from .errors import InvalidValue
from .training_config import LinearCatInit

if TYPE_CHECKING:
    import torch

    from .pipeline import DreamCachePipeline

# The one list of dtype names: every config's ``dtype`` field and every --dtype flag take it from here.
Dtype = Literal["auto", "fp16", "bf16", "fp32"]
DTYPES: tuple[str, ...] = get_args(Dtype)


# The options every command and job that loads the model shares, declared once (see dreamcache.cli_args; the
# Serve settings, a pydantic model, take the same help texts).
MODEL_HELP = "diffusers Stable Diffusion folder: local path or s3:// prefix"
DEVICE_HELP = "auto (cuda if available), cpu, cuda, cuda:1, ..."
DTYPE_HELP = "auto: fp16 on GPU, fp32 on CPU"


def model_field() -> Any:
    return option(help=MODEL_HELP)


def device_field() -> Any:
    return option("auto", DEVICE_HELP)


def dtype_field() -> Any:
    return option("auto", DTYPE_HELP)


def pick_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu; anything else is a torch device name (cpu, cuda, cuda:1, ...)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on a GPU, fp32 on CPU (where fp16 kernels are slow or missing); else fp16, bf16 or fp32."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidValue(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def quiet_libraries() -> None:
    """Keep stderr for our own messages: no weight-loading bars or advisory warnings from the libraries.

    A library not imported yet is quieted by the environment variables it reads at import, not by importing it
    here: importing diffusers pulls in torch, seconds that `dreamcache manifest` or `--help` must not pay."""
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.set_verbosity_error()


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, with which adapters, where, in which precision."""

    model: str = model_field()
    # adapter file (path or URI); None: the folder's own adapter.safetensors if it has one; False: none
    adapter: str | Literal[False] | None = field(default=None, metadata=NOT_A_FLAG)
    device: str = device_field()  # see pick_device
    dtype: Dtype = dtype_field()  # see pick_dtype
    # intra-op CPU threads; None leaves torch's default
    torch_threads: int | None = field(default=None, metadata=NOT_A_FLAG)
    # the fresh adapters' linear_cat (training's option, deviation A7)
    adapter_init: LinearCatInit = field(default="default", metadata=NOT_A_FLAG)

    def torch_device(self) -> torch.device:
        return pick_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return pick_dtype(self.dtype, self.torch_device())


def load_pipeline(spec: ModelSpec) -> DreamCachePipeline:
    """A DreamCachePipeline on ``spec``'s device and dtype, its adapters loaded."""
    import torch

    from .pipeline import DreamCachePipeline

    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    device = spec.torch_device()
    pipe = DreamCachePipeline.from_pretrained(spec.model, adapter=spec.adapter, torch_dtype=pick_dtype(spec.dtype, device),
                                              adapter_init=spec.adapter_init)
    return pipe.to(device)
