"""Facts about a diffusers model folder read from its config files alone: a job's driver and its CPU tasks use
them without loading the weights (or importing torch)."""

from __future__ import annotations

import json

from dreamcache import storage
from dreamcache.errors import InvalidValue


def native_resolution(model: str) -> int:
    """The model's native image size: the UNet's latent size times the VAE's downsampling factor."""
    unet = json.loads(storage.read_bytes(storage.join_uri(model, "unet", "config.json")))
    vae = json.loads(storage.read_bytes(storage.join_uri(model, "vae", "config.json")))
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def check_model_inputs(model: str, adapter: str | None) -> None:
    """Fail in one line, before Ray starts, when the model folder or the adapter file is not there: a job's
    actors or Serve's replicas would otherwise fail on every retry, far from the command that named them.
    ``adapter`` None: the model folder's own adapter (its absence is the loader's to report)."""
    if not storage.exists(storage.join_uri(model, "unet", "config.json")):
        raise InvalidValue(f"{model} is not a diffusers Stable Diffusion folder (no unet/config.json)",
                           kind="not_found")
    if adapter is not None and not storage.exists(adapter):
        raise storage.ObjectNotFound(f"adapter file not found: {adapter}")
