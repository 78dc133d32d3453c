"""Facts about a diffusers model folder read from its config files alone: a job's driver and its CPU tasks use
them without loading the weights (or importing torch)."""

from __future__ import annotations

import json

from dreamcache import storage


def native_resolution(model: str) -> int:
    """The model's native image size: the UNet's latent size times the VAE's downsampling factor."""
    unet = json.loads(storage.read_bytes(storage.join_uri(model, "unet", "config.json")))
    vae = json.loads(storage.read_bytes(storage.join_uri(model, "vae", "config.json")))
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
