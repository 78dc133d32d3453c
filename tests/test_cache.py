"""Feature cache extraction (spec section 1) and the cache file contract."""


import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from dreamcache.cache import CacheError, CacheInfo, FeatureCache, extract_features, reference_seed
from dreamcache.images import prepare_reference, to_tensor


def refs(*colours, size=64):
    return [Image.new("RGB", (size, size), c) for c in colours]


def test_extraction_matches_the_spec_recipe(tiny_pipe):
    """Reference computation: posterior sample, DDPM add_noise at t=1, a FULL UNet pass with capture hooks."""
    pipe = tiny_pipe
    images = refs((250, 20, 20), (20, 20, 250))
    x = to_tensor([prepare_reference(i, 64) for i in images])
    seeds = [11, 12]
    got = extract_features(pipe.unet, pipe.vae, pipe.layers, x, pipe.encode_prompt([""]), pipe.scheduler.alphas_cumprod, seeds)

    posterior = pipe.vae.encode(x).latent_dist
    eps, noise = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        eps.append(torch.randn(posterior.mean.shape[1:], generator=g))
        noise.append(torch.randn(posterior.mean.shape[1:], generator=g))
    z = (posterior.mean + posterior.std * torch.stack(eps)) * pipe.vae.config.scaling_factor
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    z1 = ddpm.add_noise(z, torch.stack(noise), torch.tensor([1, 1]))
    captured = {}
    hooks = [pipe.unet.get_submodule(l.name).register_forward_pre_hook(
        lambda m, a, k, n=l.name: captured.__setitem__(n, a[0].clone()), with_kwargs=True) for l in pipe.layers]
    try:
        pipe.unet(z1, 1, encoder_hidden_states=pipe.encode_prompt([""]).expand(2, -1, -1))
    finally:
        for h in hooks:
            h.remove()
    for layer in pipe.layers:
        torch.testing.assert_close(got[layer.name], captured[layer.name], rtol=1e-4, atol=1e-5)


def test_the_unet_stops_after_the_last_cached_block(tiny_pipe):
    calls = []
    last = tiny_pipe.layers[-1].name
    hook = tiny_pipe.unet.get_submodule(last).register_forward_hook(lambda *a: calls.append(1))
    out_hook = tiny_pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(2))
    try:
        tiny_pipe.build_caches(refs("red"))
    finally:
        hook.remove(), out_hook.remove()
    assert calls == []  # neither the last cached block nor the output conv ran


def test_caches_are_reproducible_and_independent_of_batching(tiny_pipe):
    images = refs("red", "green", "blue")
    together = tiny_pipe.build_caches(images, batch_size=3)
    again = tiny_pipe.build_caches(images, batch_size=3)
    apart = tiny_pipe.build_caches(images[::-1], batch_size=1)[::-1]
    for a, b, c in zip(together, again, apart):
        assert a.info == b.info == c.info
        for name in a.features:
            assert torch.equal(a.features[name], b.features[name])
            # other batch sizes round differently in the kernels, not in the noise: equal up to fp16 rounding
            torch.testing.assert_close(a.features[name], c.features[name], rtol=5e-3, atol=3e-3)
    other_seed = tiny_pipe.build_caches(images[:1], seed=1)[0]
    assert not torch.equal(other_seed.features[tiny_pipe.layers[0].name], together[0].features[tiny_pipe.layers[0].name])
    assert reference_seed(0, "a") != reference_seed(0, "b")


def test_cache_contents_and_metadata(tiny_pipe):
    cache = tiny_pipe.build_caches(refs("red"), ["abc"], cache_prompt="neg", preprocess="pad")[0]
    assert cache.num_references == 1
    assert all(v.dtype == torch.float16 for v in cache.features.values())
    for layer in tiny_pipe.layers:
        assert cache.features[layer.name].shape == (1, layer.channels, *layer.spatial(16, 16))
    info = cache.info
    assert (info.base_model, info.timestep, info.cache_prompt, info.preprocess, info.source_hashes, info.resolution) == (
        tiny_pipe.base_model, 1, "neg", "pad", ("abc",), (64, 64))
    back = FeatureCache.from_bytes(cache.to_bytes(), "mem", tiny_pipe.layers, tiny_pipe.base_model)
    assert back.info == info
    assert all(torch.equal(back.features[k], v) for k, v in cache.features.items())


def test_cache_prompt_changes_the_features(tiny_pipe):
    a = tiny_pipe.build_caches(refs("red"))[0]
    b = tiny_pipe.build_caches(refs("red"), cache_prompt="a photo")[0]
    name = tiny_pipe.layers[0].name
    assert not torch.equal(a.features[name], b.features[name])


def test_multi_reference_subject(tiny_pipe):
    cache = tiny_pipe.cache_subject(refs("red", "blue"), subject_id="duo", source_hashes=["h1", "h2"])
    assert cache.num_references == 2 and cache.info.source_hashes == ("h1", "h2") and cache.info.subject_id == "duo"
    back = FeatureCache.from_bytes(cache.to_bytes(), "mem", tiny_pipe.layers, tiny_pipe.base_model)
    assert back.num_references == 2


@pytest.fixture
def cache_bytes(tiny_pipe):
    return tiny_pipe.build_caches(refs("red"))[0]


def test_refusals(tiny_pipe, cache_bytes):
    cache = cache_bytes
    data = cache.to_bytes()
    layers, base = tiny_pipe.layers, tiny_pipe.base_model
    with pytest.raises(CacheError, match="another|base model"):
        FeatureCache.from_bytes(data, "x", layers, "0123456789abcdef")
    for cut in (len(data) // 2, 7, 0):
        with pytest.raises(CacheError, match="truncated or corrupt"):
            FeatureCache.from_bytes(data[:cut], "cut.safetensors", layers, base)
    missing = FeatureCache({k: v for k, v in list(cache.features.items())[1:]}, cache.info)
    with pytest.raises(CacheError, match="do not match"):
        FeatureCache.from_bytes(missing.to_bytes(), "m", layers, base)
    name = layers[0].name
    wrong_channels = FeatureCache({**cache.features, name: torch.zeros(1, 7, 4, 4)}, cache.info)
    with pytest.raises(CacheError, match="channels"):
        FeatureCache.from_bytes(wrong_channels.to_bytes(), "w", layers, base)
    wrong_size = FeatureCache({**cache.features, name: torch.zeros(1, layers[0].channels, 5, 5)}, cache.info)
    with pytest.raises(CacheError, match="expected"):
        FeatureCache.from_bytes(wrong_size.to_bytes(), "s", layers, base)
    wrong_refs = FeatureCache({**cache.features, name: cache.features[name].repeat(2, 1, 1, 1)}, cache.info)
    with pytest.raises(CacheError, match="n_refs"):
        FeatureCache.from_bytes(wrong_refs.to_bytes(), "r", layers, base)
    from safetensors.torch import save
    with pytest.raises(CacheError, match="not a DreamCache feature cache"):
        FeatureCache.from_bytes(save({"a": torch.zeros(1)}), "foreign", layers, base)
    meta = cache.info.to_metadata() | {"format_version": "99"}
    with pytest.raises(CacheError, match="version"):
        FeatureCache.from_bytes(save({k: v for k, v in cache.features.items()}, metadata=meta), "v", layers, base)


def test_caches_of_different_models_cannot_be_combined(cache_bytes):
    other = FeatureCache(cache_bytes.features, CacheInfo(**{**cache_bytes.info.__dict__, "base_model": "other"}))
    with pytest.raises(CacheError):
        FeatureCache.concat([cache_bytes, other])


def test_header_reader_refuses_short_and_implausible_headers():
    from dreamcache.safetensors_header import read_metadata

    for bad in (b"", b"\x00" * 7, (2**40).to_bytes(8, "little"), (50).to_bytes(8, "little") + b"{}"):
        with pytest.raises(ValueError):
            read_metadata(bad)


def test_fp32_caches_are_the_unrounded_features_and_fp16_stays_the_default(tiny_pipe):
    images = refs((250, 20, 20))
    prepared = to_tensor([prepare_reference(i, 64) for i in images])
    hashes = ["h"]
    from dreamcache.cache import reference_seed as seed_of
    features = extract_features(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.layers, prepared, tiny_pipe.encode_prompt([""]),
                                tiny_pipe.scheduler.alphas_cumprod, [seed_of(0, "h")])
    fp32 = tiny_pipe.build_caches(images, hashes, cache_dtype=torch.float32)[0]
    default = tiny_pipe.build_caches(images, hashes)[0]
    assert fp32.info.dtype == "float32" and default.info.dtype == "float16"
    for name, value in features.items():
        assert torch.equal(fp32.features[name], value)  # exactly what the UNet computed
        assert torch.equal(default.features[name], value.to(torch.float16))
    assert any(not torch.equal(fp32.features[n], default.features[n].float()) for n in features)  # rounding is real
    for cache in (fp32, default):  # each file records its dtype and loads back bit-exactly in it
        back = FeatureCache.from_bytes(cache.to_bytes(), "mem", tiny_pipe.layers, tiny_pipe.base_model)
        assert back.info == cache.info
        assert all(torch.equal(back.features[k], v) for k, v in cache.features.items())
    assert len(fp32.to_bytes()) > 1.9 * len(default.to_bytes()) - 4096
    with pytest.raises(ValueError, match="float16 or torch.float32"):
        tiny_pipe.build_caches(images, cache_dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="cannot be combined"):
        FeatureCache.concat([fp32, default])


def test_cache_files_without_a_dtype_field_are_fp16_and_a_lying_one_is_refused(cache_bytes):
    from safetensors.torch import save

    meta = cache_bytes.info.to_metadata()
    old = {k: v for k, v in meta.items() if k != "dtype"}  # a file written before the field existed
    back = FeatureCache.from_bytes(save(dict(cache_bytes.features), metadata=old), "old")
    assert back.info.dtype == "float16" and back.info == cache_bytes.info
    with pytest.raises(CacheError, match="metadata says float32"):
        FeatureCache.from_bytes(save(dict(cache_bytes.features), metadata={**meta, "dtype": "float32"}), "lying")
    with pytest.raises(CacheError, match="dtype 'int8'"):
        FeatureCache.from_bytes(save(dict(cache_bytes.features), metadata={**meta, "dtype": "int8"}), "odd")
