"""The converter of the authors' checkpoint, on a synthetic checkpoint with the official key names."""

import io
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load

from dreamcache.adapters import AdapterError, DreamCacheAdapters, parse_adapter_file
from dreamcache.convert import convert_official_checkpoint, official_key_shapes
from tests.test_layers import SD21, meta_unet


@pytest.fixture(scope="module")
def official_state():
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in official_key_shapes().items()}


def to_pt(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_45_keys_convert_to_the_names_of_our_adapters(official_state):
    assert len(official_state) == 45
    data = convert_official_checkpoint(to_pt(official_state), dtype=torch.float32)
    state, meta = parse_adapter_file(data, "converted")
    ours = DreamCacheAdapters(meta_unet(SD21)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert meta["backbone"] == "sd21" and meta["heads"] == "[20, 20, 10, 10, 5]"
    # values move unchanged (no transposes), e.g. the concat projection of the finest layer
    assert torch.equal(state["up_blocks.3.attentions.1.transformer_blocks.0.linear_cat.weight"],
                       official_state["diffusion_model.output_blocks.10.1.transformer_blocks.0.linear_cat.weight"])
    assert torch.equal(state["mid_block.attentions.0.transformer_blocks.0.attn_mem.to_q.weight"],
                       official_state["diffusion_model.middle_block.1.transformer_blocks.0.attn_mem.to_q.weight"])


def test_prefixed_and_nested_variants(official_state):
    prefixed = {f"model.{k}": v for k, v in official_state.items()}
    nested = {"state_dict": prefixed}
    for variant in (prefixed, nested):
        state = load(convert_official_checkpoint(to_pt(variant)))
        assert len(state) == 45 and all(v.dtype == torch.float16 for v in state.values())


def test_wrong_checkpoints_are_refused(official_state):
    key = next(iter(official_state))
    with pytest.raises(AdapterError, match="missing"):
        convert_official_checkpoint(to_pt({k: v for k, v in official_state.items() if k != key}))
    with pytest.raises(AdapterError, match="unexpected"):
        convert_official_checkpoint(to_pt({**official_state, "diffusion_model.extra.weight": torch.zeros(1)}))
    with pytest.raises(AdapterError, match="expected shape"):
        convert_official_checkpoint(to_pt({**official_state, key: torch.zeros(3, 3)}))
    with pytest.raises(AdapterError):
        convert_official_checkpoint(b"not a checkpoint")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dreamcache-pwned",))


def test_arbitrary_pickles_are_never_executed(tmp_path):
    if os.path.exists("/tmp/dreamcache-pwned"):
        os.remove("/tmp/dreamcache-pwned")
    with pytest.raises(AdapterError, match="refusing to unpickle") as refused:
        convert_official_checkpoint(pickle.dumps({"x": Payload()}))
    assert "weights_only" not in str(refused.value)  # never torch's advice to load it unsafely
    assert not os.path.exists("/tmp/dreamcache-pwned")


def test_widths_and_heads_come_from_the_checkpoint():
    """An official-layout checkpoint of a UNet 2.5x narrower than SD (128/256/512 channels): the converter reads
    each block's width from its shapes and applies the backbone's head rule (SD 2.1: 64 channels per head)."""
    narrow = dict(SD21, block_out_channels=[128, 256, 512, 512], attention_head_dim=[2, 4, 8, 8])
    adapters = DreamCacheAdapters(meta_unet(narrow))
    widths = tuple(layer.channels for layer in adapters.layers)
    assert widths == (512, 512, 256, 256, 128)
    gen = torch.Generator().manual_seed(1)
    official = {k: torch.randn(shape, generator=gen) for k, shape in official_key_shapes(widths).items()}
    state, meta = parse_adapter_file(convert_official_checkpoint(to_pt(official), dtype=torch.float32), "narrow")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in adapters.state_dict().items()}
    assert json.loads(meta["channels"]) == list(widths)
    assert json.loads(meta["heads"]) == [a.block.attn1.heads for a in adapters.adapters.values()] == [8, 8, 4, 4, 2]
    assert meta["backbone"] == "custom" and meta["head_rule"] == "sd21"
    assert torch.equal(state["up_blocks.2.attentions.2.transformer_blocks.0.attn_mem.to_v.weight"],
                       official["diffusion_model.output_blocks.8.1.transformer_blocks.0.attn_mem.to_v.weight"])
    sd15_heads = json.loads(parse_adapter_file(convert_official_checkpoint(to_pt(official), backbone="sd15"), "x")[1]["heads"])
    assert sd15_heads == [8] * 5
    with pytest.raises(AdapterError, match="head split"):  # 100 channels cannot be split into heads of 64
        odd = {k: torch.zeros(shape) for k, shape in official_key_shapes((100, 512, 256, 256, 128)).items()}
        convert_official_checkpoint(to_pt(odd))
