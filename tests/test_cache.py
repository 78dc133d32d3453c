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


def _per_reference_caches(pipe, images, hashes, batch_size):
    """The caches as build_caches made them before the batched host copy: each reference's slice of each layer
    cast and copied on its own, from the PIL path's input tensor."""
    size = (pipe.default_resolution,) * 2
    prepared = [prepare_reference(i, size) for i in images]
    context = pipe.encode_prompt([""])
    caches = []
    for start in range(0, len(prepared), batch_size):
        chunk = slice(start, start + batch_size)
        features = extract_features(pipe.unet, pipe.vae, pipe.layers, to_tensor(prepared[chunk]), context,
                                    pipe.scheduler.alphas_cumprod, [reference_seed(0, h) for h in hashes[chunk]])
        for i, h in enumerate(hashes[chunk]):
            info = CacheInfo(base_model=pipe.base_model, resolution=size, source_hashes=(h,), cache_prompt="",
                             preprocess="resize", seed=0)
            caches.append(FeatureCache({k: v[i : i + 1].to(torch.float16).to("cpu") for k, v in features.items()}, info))
    return caches


def _file(cache):
    """A cache file as (header, tensor bytes): safetensors writes the metadata in no fixed order (a Rust
    HashMap), so two writes of one cache can differ in header order; everything else is compared bytewise."""
    import json

    data = cache.to_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def test_host_caches_and_prepared_pixels_give_the_same_bytes_as_per_reference_copies(tiny_pipe):
    import numpy as np

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)) for _ in range(5)]
    hashes = [f"h{i}" for i in range(5)]
    expected = [_file(c) for c in _per_reference_caches(tiny_pipe, images, hashes, batch_size=2)]
    pixels = np.stack([np.asarray(prepare_reference(i, 64)) for i in images])  # what the caching job's read stage makes
    for got in (tiny_pipe.build_caches(images, hashes, batch_size=2),
                tiny_pipe.build_caches(images, hashes, batch_size=2, to_host=True),
                tiny_pipe.build_caches(pixels, hashes, batch_size=2, to_host=True)):
        assert [_file(c) for c in got] == expected
    # Without given hashes, an array's rows hash as the prepared images' bytes do.
    assert [c.info.source_hashes for c in tiny_pipe.build_caches(pixels[:2])] == [
        c.info.source_hashes for c in tiny_pipe.build_caches(images[:2])]
    with pytest.raises(ValueError, match="uint8"):
        tiny_pipe.build_caches(pixels[:, :32])  # not at the model's resolution


def test_one_host_buffer_is_one_copy_per_tensor_into_one_buffer(tiny_pipe):
    from dreamcache.cache import HostCopies, one_host_buffer

    features = extract_features(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.layers,
                                to_tensor([prepare_reference(i, 64) for i in refs("red", "blue", "green")]),
                                tiny_pipe.encode_prompt([""]), tiny_pipe.scheduler.alphas_cumprod, [1, 2, 3])
    half = {k: v.to(torch.float16) for k, v in features.items()}
    host = one_host_buffer(half)
    assert len({t.untyped_storage().data_ptr() for t in host.values()}) == 1  # one buffer for the whole batch
    for name, tensor in half.items():
        assert host[name].is_contiguous() and torch.equal(host[name], tensor)
        assert host[name].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()  # a copy, not a view
    # Each reference's slice of the one buffer serializes as its own copy did (safetensors accepts the views).
    info = CacheInfo(base_model="m", resolution=(64, 64), source_hashes=("a",))
    for i in range(3):
        assert (_file(FeatureCache({k: v[i : i + 1] for k, v in host.items()}, info))
                == _file(FeatureCache({k: v[i : i + 1].clone() for k, v in half.items()}, info)))
    with pytest.raises(ValueError, match="one dtype"):
        one_host_buffer({"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.float16)})
    # On the CPU the batched path is the fp16 cast alone: no stream, no copy.
    copies = HostCopies("cpu")
    assert copies.stream is None
    name = tiny_pipe.layers[0].name
    assert torch.equal(copies.start(features)[name], half[name])
    copies.wait()
