"""DreamCachePipeline: guidance formulas, one UNet call per step, mixed-subject batches, schedulers."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from dreamcache.cache import CacheError

STEPS = 3


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def two_caches(tiny_pipe):
    red, blue = tiny_pipe.build_caches([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")])
    return red, blue


def run(pipe, prompts, caches, seeds, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(prompts, caches, generator=gens(*seeds), output_type="latent", **kw).images


@pytest.mark.parametrize("guidance", ["compositional", "joint"])
def test_mixed_subject_batch_equals_per_subject_runs(tiny_pipe, two_caches, guidance):
    red, blue = two_caches
    mixed = run(tiny_pipe, ["a toy", "a toy"], [red, blue], [0, 1], guidance=guidance, image_guidance_scale=3.0)
    alone_red = run(tiny_pipe, "a toy", red, [0], guidance=guidance, image_guidance_scale=3.0)
    alone_blue = run(tiny_pipe, "a toy", blue, [1], guidance=guidance, image_guidance_scale=3.0)
    torch.testing.assert_close(mixed, torch.cat([alone_red, alone_blue]), rtol=1e-4, atol=1e-4)
    swapped = run(tiny_pipe, ["a toy", "a toy"], [blue, red], [0, 1], guidance=guidance, image_guidance_scale=3.0)
    assert (swapped - mixed).abs().max() > 1e-3  # the cache really matters per sample


def test_shared_encoder_gives_the_same_result(tiny_pipe, two_caches):
    red, blue = two_caches
    shared = run(tiny_pipe, ["a", "b"], [red, blue], [0, 1], image_guidance_scale=2.0)
    plain = run(tiny_pipe, ["a", "b"], [red, blue], [0, 1], image_guidance_scale=2.0, share_encoder=False)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)


def test_compositional_step_equals_three_separate_branches(tiny_pipe, two_caches):
    """Reference computation of spec 4.2 for one DDIM step, each branch its own UNet call."""
    pipe, (red, _) = tiny_pipe, two_caches
    s_t, s_i = 7.5, 2.5
    got = run(pipe, "a toy", red, [4], num_inference_steps=1, guidance_scale=s_t, image_guidance_scale=s_i,
              negative_prompt="blurry")
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    c, uc = pipe.encode_prompt(["a toy"]), pipe.encode_prompt(["blurry"])
    e_0 = pipe.unet(z, t, encoder_hidden_states=uc).sample
    with pipe.adapters.reference([red.features], [0]):
        e_i = pipe.unet(z, t, encoder_hidden_states=uc).sample
        e_it = pipe.unet(z, t, encoder_hidden_states=c).sample
    eps = e_0 + s_i * (e_i - e_0) + s_t * (e_it - e_i)
    expected = pipe.scheduler.step(eps, t, z).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_joint_step_equals_two_separate_branches(tiny_pipe, two_caches):
    pipe, (red, _) = tiny_pipe, two_caches
    got = run(pipe, "a toy", red, [4], num_inference_steps=1, guidance="joint", guidance_scale=5.0)
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    e_0 = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt([""])).sample
    with pipe.adapters.reference([red.features], [0]):
        e_it = pipe.unet(z, t, encoder_hidden_states=pipe.encode_prompt(["a toy"])).sample
    expected = pipe.scheduler.step(e_0 + 5.0 * (e_it - e_0), t, z).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", ["compositional", "joint"])
def test_one_unet_call_per_step_and_keys_values_once_per_call(tiny_pipe, two_caches, guidance):
    red, blue = two_caches
    unet_calls, key_projections = [], []
    h1 = tiny_pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    first = tiny_pipe.adapters.adapters[tiny_pipe.layers[0].name].block.attn_mem.to_k
    h2 = first.register_forward_hook(lambda *a: key_projections.append(1))
    try:
        run(tiny_pipe, ["a", "b", "c"], [red, blue, red], range(6), guidance=guidance, num_inference_steps=4,
            num_images_per_prompt=2)
    finally:
        h1.remove(), h2.remove()
    assert len(unet_calls) == 4
    assert len(key_projections) == 2  # one per distinct subject, not per step or per sample


def test_without_cache_it_is_stock_stable_diffusion(tiny_pipe):
    sd = StableDiffusionPipeline(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer,
                                 unet=tiny_pipe.unet, scheduler=tiny_pipe.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    expected = sd("a toy", num_inference_steps=STEPS, generator=gens(9), output_type="np").images
    got = tiny_pipe("a toy", None, num_inference_steps=STEPS, generator=gens(9), output_type="np").images
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_same_seed_same_image_and_outputs(tiny_pipe, two_caches):
    red, _ = two_caches
    a = tiny_pipe("x", red, num_inference_steps=2, generator=gens(3)).images
    b = tiny_pipe("x", red, num_inference_steps=2, generator=gens(3)).images
    assert isinstance(a[0], Image.Image) and a[0].size == (64, 64)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np_out = tiny_pipe("x", red, num_inference_steps=2, generator=gens(3), output_type="np", height=48, width=80).images
    assert np_out.shape == (1, 48, 80, 3)


def test_single_branch_when_guidance_is_off(tiny_pipe, two_caches):
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        run(tiny_pipe, "x", two_caches[0], [0], guidance_scale=1.0)
    finally:
        hook.remove()
    assert calls == [1] * STEPS


def test_official_ddim_configuration(tiny_pipe):
    sched = tiny_pipe.scheduler
    assert sched.config.clip_sample is False and sched.config.set_alpha_to_one is False
    sched.set_timesteps(50)
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1 and len(sched.timesteps) == 50
    assert torch.isclose(sched.final_alpha_cumprod, sched.alphas_cumprod[0])


def test_any_diffusers_scheduler(tiny_pipe, two_caches):
    original = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        out = run(tiny_pipe, "x", two_caches[0], [0])
        assert torch.isfinite(out).all()
    finally:
        tiny_pipe.scheduler = original


def test_bad_calls(tiny_pipe, two_caches):
    red, blue = two_caches
    with pytest.raises(ValueError, match="caches for"):
        tiny_pipe(["a", "b", "c"], [red, blue], num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance"):
        tiny_pipe("a", red, guidance="both", num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_pipe("a", red, height=50, num_inference_steps=1)
    with pytest.raises(TypeError):
        tiny_pipe("a", {"x": 1}, num_inference_steps=1)
    foreign = type(red)(red.features, type(red.info)(**{**red.info.__dict__, "base_model": "ffffffffffffffff"}))
    with pytest.raises(CacheError, match="base model"):
        tiny_pipe("a", foreign, num_inference_steps=1)
