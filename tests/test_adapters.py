"""Conditioning adapters: plug-and-play bypass, the spec's block formula, per-row bypass, files."""

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from dreamcache.adapters import (
    AdapterError, DreamCacheAdapters, adapter_file_bytes, parse_adapter_file,
)
from dreamcache.models import tiny_components


@pytest.fixture
def unet_pair():
    stock = tiny_components(seed=3)["unet"].eval()
    adapted = copy.deepcopy(stock)
    torch.manual_seed(0)
    return stock, adapted, DreamCacheAdapters(adapted)


def random_caches(adapters, n_subjects, n_refs=1, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {l.name: torch.randn(n_refs, l.channels, *l.spatial(size, size), generator=gen) for l in adapters.layers}
        for _ in range(n_subjects)
    ]


def unet_inputs(batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, 77, 32, generator=gen)


def test_without_cache_the_unet_is_bit_identical(unet_pair):
    stock, adapted, adapters = unet_pair
    x, text = unet_inputs(2)
    expected = stock(x, 500, encoder_hidden_states=text).sample
    assert torch.equal(adapted(x, 500, encoder_hidden_states=text).sample, expected)
    with adapters.reference(random_caches(adapters, 1), [None, None]):  # every row bypassed
        assert torch.equal(adapted(x, 500, encoder_hidden_states=text).sample, expected)


def test_a_cache_changes_the_output_and_none_rows_stay_stock(unet_pair):
    stock, adapted, adapters = unet_pair
    x, text = unet_inputs(3)
    expected = stock(x, 500, encoder_hidden_states=text).sample
    with adapters.reference(random_caches(adapters, 1), [0, None, 0]):
        out = adapted(x, 500, encoder_hidden_states=text).sample
    assert (out[0] - expected[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], expected[1], rtol=1e-5, atol=1e-5)


def reference_block(block, x, r, text, scale=1.0):
    """Spec 2.1 written out: x + linear_cat([attn1(norm1 x), MHA(norm2_mem x, r, r)]); then attn2, ff. With an
    adapter scale s (the extension): x + a + s * (linear_cat([a, a_c]) - a)."""
    heads = block.attn_mem.heads
    def mha(q_in, kv, attn):
        q, k, v = attn.to_q(q_in), attn.to_k(kv), attn.to_v(kv)
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return attn.to_out[0](out)
    a = block.attn1(block.norm1(x))
    a_c = mha(block.norm2_mem(x), r, block.attn_mem)
    h = x + a + scale * (block.linear_cat(torch.cat([a, a_c], dim=-1)) - a)
    h = h + block.attn2(block.norm2(h), encoder_hidden_states=text)
    return h + block.ff(block.norm3(h))


def test_block_output_matches_the_spec_formula(unet_pair):
    _, adapted, adapters = unet_pair
    layer = adapters.layers[-1]
    block = adapters.adapters[layer.name].block
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, layer.channels, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    caches = random_caches(adapters, 2, seed=7)
    with adapters.reference(caches, [1, 0]):
        out = block(x, encoder_hidden_states=text)
    for row, subject in ((0, 1), (1, 0)):
        r = caches[subject][layer.name].permute(0, 2, 3, 1).reshape(1, -1, layer.channels)
        expected = reference_block(block, x[row : row + 1], r, text[row : row + 1])
        torch.testing.assert_close(out[row : row + 1], expected, rtol=1e-4, atol=1e-5)


def test_adapter_scale_blends_the_bypass_and_the_method(unet_pair):
    stock, adapted, adapters = unet_pair
    layer = adapters.layers[1]
    block = adapters.adapters[layer.name].block
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 256, layer.channels, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen)
    caches = random_caches(adapters, 1, seed=8)
    r = caches[0][layer.name].permute(0, 2, 3, 1).reshape(1, -1, layer.channels)
    adapters.set_scale({layer.name: 0.3})
    with adapters.reference(caches, [0]):
        out = block(x, encoder_hidden_states=text)
    torch.testing.assert_close(out, reference_block(block, x, r, text, scale=0.3), rtol=1e-4, atol=1e-5)
    # scale 0 on every layer: bit-identical to the stock UNet although every row has a cache
    adapters.set_scale(0.0)
    ux, utext = unet_inputs(2)
    with adapters.reference(random_caches(adapters, 1), [0, 0]):
        assert torch.equal(adapted(ux, 500, encoder_hidden_states=utext).sample,
                           stock(ux, 500, encoder_hidden_states=utext).sample)


def test_multi_reference_subjects_of_different_sizes_in_one_batch(unet_pair):
    _, adapted, adapters = unet_pair
    x, text = unet_inputs(2)
    one = random_caches(adapters, 1, n_refs=1, seed=1)[0]
    two = random_caches(adapters, 1, n_refs=2, seed=2)[0]
    with adapters.reference([one, two], [0, 1]):  # padded keys with a mask
        mixed = adapted(x, 500, encoder_hidden_states=text).sample
    with adapters.reference([one], [0]):
        alone_one = adapted(x[:1], 500, encoder_hidden_states=text[:1]).sample
    with adapters.reference([two], [0]):
        alone_two = adapted(x[1:], 500, encoder_hidden_states=text[1:]).sample
    torch.testing.assert_close(mixed, torch.cat([alone_one, alone_two]), rtol=1e-4, atol=1e-5)
    # the second reference matters: two refs differ from the first one alone
    first_only = {k: v[:1] for k, v in two.items()}
    with adapters.reference([first_only], [0]):
        assert (adapted(x[1:], 500, encoder_hidden_states=text[1:]).sample - alone_two).abs().max() > 1e-4


def test_adapters_survive_an_attention_processor_swap(unet_pair):
    stock, adapted, adapters = unet_pair
    adapted.set_attn_processor(AttnProcessor())
    x, text = unet_inputs(1)
    with adapters.reference(random_caches(adapters, 1), [0]):
        out = adapted(x, 500, encoder_hidden_states=text).sample
    assert (out - stock(x, 500, encoder_hidden_states=text).sample).abs().max() > 1e-3


def test_identity_init_starts_exactly_at_sd():
    stock = tiny_components(seed=3)["unet"].eval()
    adapted = copy.deepcopy(stock)
    adapters = DreamCacheAdapters(adapted, init="identity")
    x, text = unet_inputs(1)
    with adapters.reference(random_caches(adapters, 1), [0]):
        out = adapted(x, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, stock(x, 500, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)


def test_remove_restores_the_stock_unet(unet_pair):
    stock, adapted, adapters = unet_pair
    adapters.remove()
    assert adapted.state_dict().keys() == stock.state_dict().keys()
    DreamCacheAdapters(adapted)  # can be installed again
    with pytest.raises(AdapterError, match="already has"):
        DreamCacheAdapters(adapted)


def test_file_round_trip_and_names(unet_pair):
    _, adapted, adapters = unet_pair
    data = adapter_file_bytes(adapters, dtype=torch.float32)
    state, meta = parse_adapter_file(data, "mem")
    assert all(k.split(".transformer_blocks.0.")[1].split(".")[0] in ("norm2_mem", "attn_mem", "linear_cat") for k in state)
    assert meta["backbone"] == "custom" and "up_blocks.3.attentions.1" in meta["layers"]
    other = DreamCacheAdapters(copy.deepcopy(tiny_components(seed=3)["unet"]))
    other.load_state_dict(state)
    for key, value in adapters.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_bad_adapter_files_are_refused(unet_pair):
    _, _, adapters = unet_pair
    data = adapter_file_bytes(adapters)
    with pytest.raises(AdapterError, match="not a readable"):
        parse_adapter_file(data[: len(data) // 2], "half.safetensors")
    with pytest.raises(AdapterError, match="not a readable"):
        parse_adapter_file(b"", "empty.safetensors")
    state = adapters.state_dict()
    with pytest.raises(AdapterError, match="missing"):
        adapters.load_state_dict({k: v for k, v in list(state.items())[1:]})
    key = next(iter(state))
    with pytest.raises(AdapterError, match="shape"):
        adapters.load_state_dict({**state, key: torch.zeros(3)})
