"""The diffusers idioms of DreamCachePipeline (issue 13), each against a reference computation: step callbacks and
interrupt, reference_images, adapter scale and unload, prompt embeddings, guidance_rescale, custom timesteps, eta,
clip_skip, save_pretrained / from_pretrained."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from dreamcache.adapters import AdapterError
from dreamcache.models import tiny_components
from dreamcache.pipeline import ADAPTER_WEIGHTS_NAME, DreamCachePipeline

STEPS = 3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt, cache, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("image_guidance_scale", 2.0)
    return pipe(prompt, cache, generator=gen(seed), output_type="latent", **kw).images


@pytest.fixture(scope="module")
def red_image():
    return Image.new("RGB", (64, 64), (230, 30, 30))


@pytest.fixture(scope="module")
def red(tiny_pipe, red_image):
    return tiny_pipe.cache_subject([red_image])


@pytest.fixture
def scale_reset(tiny_pipe):
    yield
    tiny_pipe.set_adapter_scale(1.0)  # the session pipe is shared: leave the method as published


def count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


# -- 1. callback_on_step_end and interrupt ------------------------------------------------------------------------
def test_a_no_op_callback_is_bit_identical(tiny_pipe, red):
    seen = []

    def no_op(pipe, step, timestep, tensors):
        seen.append((step, int(timestep), sorted(tensors)))
        return tensors

    plain = run(tiny_pipe, "a toy", red)
    with_callback = run(tiny_pipe, "a toy", red, callback_on_step_end=no_op,
                        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert torch.equal(plain, with_callback)
    tiny_pipe.scheduler.set_timesteps(STEPS)
    assert [(s, t) for s, t, _ in seen] == list(enumerate(tiny_pipe.scheduler.timesteps.tolist()))
    assert seen[0][2] == ["latents", "negative_prompt_embeds", "prompt_embeds"]


@pytest.mark.parametrize("k", [0, 1])
def test_interrupt_at_step_k_stops_after_k_plus_1_steps(tiny_pipe, red, k):
    recorded = {}

    def record(pipe, step, timestep, tensors):
        recorded[step] = tensors["latents"].clone()
        return {}

    run(tiny_pipe, "a toy", red, num_inference_steps=4, callback_on_step_end=record)

    def stop(pipe, step, timestep, tensors):
        if step == k:
            pipe._interrupt = True
        return {}

    calls, handle = count_unet_calls(tiny_pipe)
    try:
        out = run(tiny_pipe, "a toy", red, num_inference_steps=4, callback_on_step_end=stop)
    finally:
        handle.remove()
    assert len(calls) == k + 1 and tiny_pipe.interrupt
    assert torch.equal(out, recorded[k])  # the latents after step k of the same 4-step schedule
    run(tiny_pipe, "a toy", red, num_inference_steps=1)
    assert not tiny_pipe.interrupt  # every call starts uninterrupted


def test_a_callback_that_changes_the_latents_changes_the_output(tiny_pipe, red):
    plain = run(tiny_pipe, "a toy", red)
    halved = run(tiny_pipe, "a toy", red,
                 callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0.5} if i == 0 else {})
    assert (plain - halved).abs().max() > 1e-2


def test_a_callback_can_replace_the_prompt_embeddings(tiny_pipe, red):
    other = tiny_pipe.encode_prompt(["a cat"])
    swapped = run(tiny_pipe, "a toy", red, num_inference_steps=1,
                  callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": other})
    # the swap happens after the only step: the result is that of "a toy"; with two steps step 2 sees "a cat"
    assert torch.equal(swapped, run(tiny_pipe, "a toy", red, num_inference_steps=1))
    two = run(tiny_pipe, "a toy", red, num_inference_steps=2,
              callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": other})
    assert (two - run(tiny_pipe, "a toy", red, num_inference_steps=2)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(tiny_pipe, "a toy", red, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


# -- 2. reference_images ------------------------------------------------------------------------------------------
def test_reference_images_equal_cache_subject_then_cache(tiny_pipe, red, red_image):
    blue_image = Image.new("RGB", (64, 64), (20, 20, 240))
    blue = tiny_pipe.cache_subject([blue_image])
    via_cache = run(tiny_pipe, ["a toy", "a cup"], [red, blue], 0, num_images_per_prompt=1)
    via_images = tiny_pipe(["a toy", "a cup"], reference_images=[[red_image], [blue_image]], generator=gen(0),
                           num_inference_steps=STEPS, image_guidance_scale=2.0, output_type="latent").images
    assert torch.equal(via_cache, via_images)
    one_image = tiny_pipe("a toy", reference_images=red_image, generator=gen(0), num_inference_steps=STEPS,
                          image_guidance_scale=2.0, output_type="latent").images
    assert torch.equal(one_image, run(tiny_pipe, "a toy", red))


def test_reference_images_and_cache_are_exclusive(tiny_pipe, red, red_image):
    with pytest.raises(ValueError, match="not both"):
        tiny_pipe("a toy", red, reference_images=[red_image], num_inference_steps=1)
    with pytest.raises(ValueError, match="no subject"):
        tiny_pipe("a toy", num_inference_steps=1)
    with pytest.raises(ValueError, match="reference_images entries"):
        tiny_pipe(["a", "b"], reference_images=[red_image], num_inference_steps=1)


# -- 3. adapter scale and unload ----------------------------------------------------------------------------------
def test_scale_zero_is_the_no_cache_output_and_one_the_method(tiny_pipe, red, scale_reset):
    published = run(tiny_pipe, "a toy", red)
    tiny_pipe.set_adapter_scale(0.0)
    # spec 4.2: with the bypass blended in fully, e_I = e_0, so compositional guidance is plain CFG
    # The two runs batch their guidance branches differently, so the CPU's kernels may round differently: latents
    # reach |12| and differed by 1.3e-5 on one Xeon (1e-6 on another); half the scale moves them by 0.3.
    torch.testing.assert_close(run(tiny_pipe, "a toy", red), run(tiny_pipe, "a toy", None), rtol=1e-5, atol=1e-4)
    tiny_pipe.set_adapter_scale(0.5)
    half = run(tiny_pipe, "a toy", red)
    assert (half - published).abs().max() > 1e-4
    tiny_pipe.set_adapter_scale(1.0)
    assert torch.equal(run(tiny_pipe, "a toy", red), published)


def test_per_layer_scales(tiny_pipe, red, scale_reset):
    names = [layer.name for layer in tiny_pipe.layers]
    tiny_pipe.set_adapter_scale({names[0]: 0.5, names[2]: 1.0})
    assert tiny_pipe.adapters.scales() == {n: {names[0]: 0.5, names[2]: 1.0}.get(n, 0.0) for n in names}
    only_mid = run(tiny_pipe, "a toy", red)
    tiny_pipe.set_adapter_scale({name: 0.0 for name in names})
    assert (only_mid - run(tiny_pipe, "a toy", red)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown adapter layers"):
        tiny_pipe.set_adapter_scale({"down_blocks.0.attentions.0": 1.0})


def test_unload_restores_the_stock_unet(tiny_model_dir, red):
    pipe = DreamCachePipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    stock = tiny_components(seed=0)["unet"].eval()  # write_tiny_model's seed
    pipe.unload_adapter()
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in stock.attn_processors.items()}
    assert [n for n, _ in pipe.unet.named_modules()] == [n for n, _ in stock.named_modules()]
    assert [n for n, _ in pipe.unet.named_buffers()] == [n for n, _ in stock.named_buffers()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    assert torch.equal(pipe.unet(x, 500, encoder_hidden_states=text).sample, stock(x, 500, encoder_hidden_states=text).sample)
    with pytest.raises(AdapterError, match="unloaded"):
        pipe("a toy", red, num_inference_steps=1)
    assert pipe("a toy", None, num_inference_steps=1, output_type="latent").images.shape == (1, 4, 16, 16)
    pipe.load_adapter(str(tiny_model_dir / "adapter.safetensors"))  # and back
    assert pipe.adapters is not None and torch.isfinite(run(pipe, "a toy", red)).all()


# -- 5. prompt embeddings, guidance_rescale, timesteps, eta, clip_skip -------------------------------------------
def test_prompt_embeds_give_the_same_image_as_the_prompt(tiny_pipe, red):
    by_text = run(tiny_pipe, ["a toy", "a cup"], red, negative_prompt="blurry", num_images_per_prompt=2)
    by_embeds = tiny_pipe(prompt_embeds=tiny_pipe.encode_prompt(["a toy", "a cup"]), cache=red,
                          negative_prompt_embeds=tiny_pipe.encode_prompt(["blurry", "blurry"]), generator=gen(0),
                          num_inference_steps=STEPS, image_guidance_scale=2.0, num_images_per_prompt=2,
                          output_type="latent").images
    assert torch.equal(by_text, by_embeds)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        tiny_pipe("a toy", red, prompt_embeds=tiny_pipe.encode_prompt(["a toy"]), num_inference_steps=1)


def one_step_reference(pipe, cache, prompt, negative, s_t, s_i, seed):
    """Spec 4.2 for one DDIM step, each branch its own UNet call; returns (t, z, guided eps, e_it)."""
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 16, 16, generator=gen(seed))
    c, uc = pipe.encode_prompt([prompt]), pipe.encode_prompt([negative])
    e_0 = pipe.unet(z, t, encoder_hidden_states=uc).sample
    with pipe.adapters.reference([cache.features], [0]):
        e_i = pipe.unet(z, t, encoder_hidden_states=uc).sample
        e_it = pipe.unet(z, t, encoder_hidden_states=c).sample
    return t, z, e_0 + s_i * (e_i - e_0) + s_t * (e_it - e_i), e_it


def test_guidance_rescale_equals_a_hand_computation(tiny_pipe, red):
    s_t, s_i, phi = 7.5, 2.5, 0.7
    got = run(tiny_pipe, "a toy", red, 4, num_inference_steps=1, guidance_scale=s_t, image_guidance_scale=s_i,
              negative_prompt="blurry", guidance_rescale=phi)
    t, z, eps, e_it = one_step_reference(tiny_pipe, red, "a toy", "blurry", s_t, s_i, 4)
    # rescale_noise_cfg written out (Lin et al. 2023, eq. 15-16): match the std of the text-conditioned branch
    rescaled = eps * (e_it.std(dim=(1, 2, 3), keepdim=True) / eps.std(dim=(1, 2, 3), keepdim=True))
    expected = tiny_pipe.scheduler.step(phi * rescaled + (1 - phi) * eps, t, z).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    not_rescaled = tiny_pipe.scheduler.step(eps, t, z).prev_sample
    assert (got - not_rescaled).abs().max() > 1e-3
    assert torch.equal(run(tiny_pipe, "a toy", red, guidance_rescale=0.0), run(tiny_pipe, "a toy", red))


def test_eta_is_ddim_eta(tiny_pipe, red):
    got = run(tiny_pipe, "a toy", red, 4, num_inference_steps=1, guidance_scale=1.0, eta=1.0)
    tiny_pipe.scheduler.set_timesteps(1)
    t = tiny_pipe.scheduler.timesteps[0]
    generator = gen(4)  # the pipeline draws the start latents, then the DDIM step noise, from it
    z = torch.randn(1, 4, 16, 16, generator=generator)
    with tiny_pipe.adapters.reference([red.features], [0]):
        eps = tiny_pipe.unet(z, t, encoder_hidden_states=tiny_pipe.encode_prompt(["a toy"])).sample
    expected = tiny_pipe.scheduler.step(eps, t, z, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    deterministic = run(tiny_pipe, "a toy", red, 4, num_inference_steps=1, guidance_scale=1.0)
    assert (got - deterministic).abs().max() > 1e-3


def test_custom_timesteps_as_retrieve_timesteps(tiny_pipe, red):
    original = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = DDPMScheduler.from_config(original.config)
        tiny_pipe.scheduler.set_timesteps(STEPS)
        default = tiny_pipe.scheduler.timesteps.tolist()
        by_count = run(tiny_pipe, "a toy", red)
        calls, handle = count_unet_calls(tiny_pipe)
        try:
            by_list = run(tiny_pipe, "a toy", red, timesteps=default)
            other = run(tiny_pipe, "a toy", red, timesteps=[900, 500, 300, 1])
        finally:
            handle.remove()
        assert torch.equal(by_count, by_list) and len(calls) == STEPS + 4 and tiny_pipe.num_timesteps == 4
        assert (other - by_count).abs().max() > 1e-3
    finally:
        tiny_pipe.scheduler = original
    with pytest.raises(ValueError, match="custom timestep"):  # DDIM's set_timesteps takes no list
        run(tiny_pipe, "a toy", red, timesteps=[901, 1])


def test_clip_skip_as_diffusers_encode_prompt(tiny_pipe, red):
    """clip_skip=1: the penultimate layer through the final LayerNorm, i.e. the encoder with its last layer cut off.
    (diffusers' own encode_prompt cannot be the reference: it reads ``text_encoder.text_model``, which
    transformers 5 removed.)"""
    cut = copy.deepcopy(tiny_pipe.text_encoder)
    del cut.encoder.layers[-1]
    ids = tiny_pipe.tokenizer(["a toy"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = cut(ids)[0]
    text = tiny_pipe.encode_prompt(["a toy"], clip_skip=1)
    torch.testing.assert_close(text, expected, rtol=1e-6, atol=1e-6)
    assert (tiny_pipe.encode_prompt(["a toy"]) - text).abs().max() > 1e-3
    skipped = run(tiny_pipe, "a toy", red, negative_prompt="blurry", clip_skip=1)
    # the negative is encoded without clip_skip, as diffusers' StableDiffusionPipeline does
    by_embeds = tiny_pipe(prompt_embeds=text, negative_prompt_embeds=tiny_pipe.encode_prompt(["blurry"]), cache=red,
                          generator=gen(0), num_inference_steps=STEPS, image_guidance_scale=2.0,
                          output_type="latent").images
    assert torch.equal(skipped, by_embeds)


# -- 6. save_pretrained / from_pretrained ------------------------------------------------------------------------
def test_save_pretrained_round_trip(tiny_pipe, red, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "model_index.json").is_file() and (saved / ADAPTER_WEIGHTS_NAME).is_file()
    unet_keys = load_file(saved / "unet" / "diffusion_pytorch_model.safetensors").keys()
    assert not any(m in k for k in unet_keys for m in ("attn_mem", "norm2_mem", "linear_cat"))  # a stock UNet
    assert tiny_pipe.adapters.state_dict().keys() <= dict(tiny_pipe.unet.named_parameters()).keys()  # still on
    loaded = DreamCachePipeline.from_pretrained(saved)  # no adapter= : found beside the model
    loaded.set_progress_bar_config(disable=True)
    assert loaded.base_model == tiny_pipe.base_model
    for key, value in tiny_pipe.adapters.state_dict().items():
        assert torch.equal(loaded.adapters.state_dict()[key], value)
    assert torch.equal(run(loaded, "a toy", red), run(tiny_pipe, "a toy", red))
    fresh = DreamCachePipeline.from_pretrained(saved, adapter=False)
    key = next(k for k in loaded.adapters.state_dict() if k.endswith("linear_cat.weight"))
    assert not torch.equal(fresh.adapters.state_dict()[key], loaded.adapters.state_dict()[key])
    StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)  # stock loaders read the folder


def test_adapter_scale_is_a_buffer_outside_the_state_dict(tiny_pipe):
    keys = set(tiny_pipe.adapters.state_dict())
    assert not any("dreamcache_scale" in k for k in keys)
    assert not any("dreamcache_scale" in k for k in tiny_pipe.unet.state_dict())
    assert {b.dtype for n, b in tiny_pipe.unet.named_buffers() if n.endswith("dreamcache_scale")} == {torch.float32}

