"""Which transformer blocks of a UNet DreamCache caches and adapts.

The official code (``Memorizing_UNetModel``) numbers every spatial transformer of the UNet in build order
(encoder, then mid, then decoder) and turns the mid-block transformer plus every decoder transformer with an
even running index into a memory layer. For SD 1.5 and SD 2.1-base that gives the five blocks of the spec
(section 1.2). The rule is derived here from a ``UNet2DConditionModel`` config alone, so it can be checked
against full-size architectures without allocating them, and it generalises to other layouts (the tiny model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CachedLayer:
    """One memory layer: a ``Transformer2DModel`` whose input is cached and whose block gets an adapter."""

    name: str  # diffusers module path, e.g. "up_blocks.2.attentions.0"
    channels: int  # C of the cached feature map and of the adapter
    downsample: int  # spatial factor of this stage relative to the latent (1, 2, 4, 8 for SD)
    running_index: int  # the official ``id_attention``

    def tokens(self, latent_height: int, latent_width: int) -> int:
        height, width = self.spatial(latent_height, latent_width)
        return height * width

    def spatial(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        # diffusers' Downsample2D (conv, stride 2, padding 1) rounds up for odd sizes.
        h, w = latent_height, latent_width
        f = self.downsample
        while f > 1:
            h, w, f = (h + 1) // 2, (w + 1) // 2, f // 2
        return h, w


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def select_layers(unet_config: Mapping[str, Any]) -> list[CachedLayer]:
    """Apply the official layer rule to a ``UNet2DConditionModel`` config (a dict or a FrozenDict)."""
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    channels = list(unet_config["block_out_channels"])
    n = len(down_types)
    layers_per_block = _per_block(unet_config.get("layers_per_block", 2), n)
    transformer_depth = _per_block(unet_config.get("transformer_layers_per_block", 1), n)
    if any(d != 1 for d in transformer_depth):
        # Each memory transformer of the official model has depth 1; the adapter lives in transformer_blocks.0.
        raise ValueError("DreamCache supports transformer_layers_per_block == 1 only")

    index = 0
    for block_type, count in zip(down_types, layers_per_block):
        if "CrossAttn" in block_type:
            index += count  # encoder transformers: numbered, never cached

    selected: list[CachedLayer] = []
    mid_type = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type == "UNetMidBlock2DCrossAttn":
        selected.append(CachedLayer("mid_block.attentions.0", channels[-1], 2 ** (n - 1), index))
        index += 1

    rev_channels = channels[::-1]
    rev_layers = layers_per_block[::-1]
    for i, block_type in enumerate(up_types):
        if "CrossAttn" not in block_type:
            continue
        for j in range(rev_layers[i] + 1):  # decoder blocks have one more layer than encoder blocks
            if index % 2 == 0:
                selected.append(CachedLayer(f"up_blocks.{i}.attentions.{j}", rev_channels[i], 2 ** (n - 1 - i), index))
            index += 1
    if not selected:
        raise ValueError("this UNet has no cross-attention transformer that DreamCache can cache")
    return selected


def adapter_parameter_count(layers: list[CachedLayer]) -> int:
    """norm2_mem (2C) + attn_mem (4C^2 + C) + linear_cat (2C^2 + C) per layer: 6C^2 + 4C."""
    return sum(6 * layer.channels**2 + 4 * layer.channels for layer in layers)


def cache_value_count(layers: list[CachedLayer], latent_height: int, latent_width: int) -> int:
    return sum(layer.channels * layer.tokens(latent_height, latent_width) for layer in layers)
