"""The layer rule against full-size SD 1.5 / 2.1-base architectures (meta device: no memory is allocated)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from dreamcache.adapters import DreamCacheAdapters
from dreamcache.layers import adapter_parameter_count, cache_value_count, select_layers

SD_COMMON = dict(
    sample_size=64,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
)
SD15 = dict(SD_COMMON, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(SD_COMMON, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SPEC_LAYERS = [  # spec section 1.2
    ("mid_block.attentions.0", 1280, (8, 8)),
    ("up_blocks.1.attentions.1", 1280, (16, 16)),
    ("up_blocks.2.attentions.0", 640, (32, 32)),
    ("up_blocks.2.attentions.2", 640, (32, 32)),
    ("up_blocks.3.attentions.1", 320, (64, 64)),
]


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_spec_layers_counts_and_sizes(config):
    layers = select_layers(config)
    assert [(l.name, l.channels, l.spatial(64, 64)) for l in layers] == SPEC_LAYERS
    assert [l.running_index for l in layers] == [6, 8, 10, 12, 14]
    assert cache_value_count(layers, 64, 64) == 3_031_040
    assert adapter_parameter_count(layers) == 25_207_040


@pytest.mark.parametrize("config,heads", [(SD15, [8] * 5), (SD21, [20, 20, 10, 10, 5])], ids=["sd15", "sd21"])
def test_installed_adapters_on_full_size_unet(config, heads):
    unet = meta_unet(config)
    adapters = DreamCacheAdapters(unet)
    assert adapters.num_parameters() == 25_207_040
    assert [a.block.attn_mem.heads for a in adapters.adapters.values()] == heads
    keys = adapters.state_dict()
    assert len(keys) == 45
    assert keys["up_blocks.3.attentions.1.transformer_blocks.0.linear_cat.weight"].shape == (320, 640)
    assert keys["mid_block.attentions.0.transformer_blocks.0.attn_mem.to_out.0.bias"].shape == (1280,)
    assert "mid_block.attentions.0.transformer_blocks.0.attn_mem.to_q.bias" not in keys  # bias=False as official


def test_rule_matches_a_walk_over_the_built_modules():
    """Independent check: number the Transformer2DModels in forward order as the official code does."""
    unet = meta_unet(SD21)
    ordered = [f"down_blocks.{i}.attentions.{j}" for i, b in enumerate(unet.down_blocks) for j in range(len(getattr(b, "attentions", [])))]
    ordered += ["mid_block.attentions.0"]
    ordered += [f"up_blocks.{i}.attentions.{j}" for i, b in enumerate(unet.up_blocks) for j in range(len(getattr(b, "attentions", [])))]
    assert len(ordered) == 16
    mid = ordered.index("mid_block.attentions.0")
    expected = [name for idx, name in enumerate(ordered) if idx == mid or (idx > mid and idx % 2 == 0)]
    assert [l.name for l in select_layers(unet.config)] == expected


def test_odd_latent_sizes_round_up_like_the_unet():
    layer = select_layers(SD21)[0]
    assert layer.spatial(65, 63) == (9, 8)


def test_unsupported_layouts_are_refused():
    with pytest.raises(ValueError, match="transformer_layers_per_block"):
        select_layers(dict(SD21, transformer_layers_per_block=2))
    with pytest.raises(ValueError, match="no cross-attention"):
        select_layers(dict(SD21, down_block_types=["DownBlock2D"] * 4, up_block_types=["UpBlock2D"] * 4, mid_block_type="UNetMidBlock2D"))
