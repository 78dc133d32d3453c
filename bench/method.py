"""Method benchmarks: generation cost vs plain diffusers SD, and caching throughput vs a bare loop.

Every figure is a ratio against a baseline measured in the same run, on the same components, steps and batch:

  generation   DreamCachePipeline (joint / compositional, with and without the shared encoder path)
               vs StableDiffusionPipeline with CFG, seconds per denoising step (decode excluded)
  caching      DreamCachePipeline.build_caches vs a bare "VAE encode + full UNet forward" loop, images/s
  compile      (--compile MODE) DreamCache joint vs a bare UNet CFG step, eager and torch.compile(unet, mode=MODE)

    python bench/method.py                          # tiny model on CPU (what `make bench` runs)
    python bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 8 --resolution 512
    python bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 1 --skip generation \
        --skip caching --compile reduce-overhead     # CUDA graphs: the batch-1 host overhead taken away

``sd21-random`` builds the SD 2.1-base architecture with random weights: the cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamcache.models import ddim_scheduler, offline_clip_tokenizer, tiny_components  # noqa: E402
from dreamcache.pipeline import DreamCachePipeline  # noqa: E402
from timing import sync, timed_runs  # noqa: E402 - bench/timing.py (the script's folder is on sys.path)


def sd21_random_components() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=1024,
        vocab_size=len(tokenizer), hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": ddim_scheduler()}


def write_sd21_random(folder: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """The SD 2.1-base architecture with random weights as a diffusers folder plus random adapters, for the job
    benchmarks whose actors load a model from storage as a real run would. Built on ``device`` (seconds on a GPU,
    minutes of random init on a small CPU) and written in ``dtype`` (fp16 halves the bytes to write and load)."""
    from diffusers import StableDiffusionPipeline

    from dreamcache.adapters import DreamCacheAdapters, adapter_file_bytes

    with torch.device(device):
        components = sd21_random_components()
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(dtype)
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    adapters = DreamCacheAdapters(components["unet"])
    (folder / "adapter.safetensors").write_bytes(adapter_file_bytes(adapters, dtype=dtype))
    adapters.remove()
    return folder


def best_of(fn, device: torch.device, repeat: int) -> float:
    return statistics.median(timed_runs(fn, device, repeat))


def bench_generation(pipe, sd, cache, args, device) -> None:
    prompts = ["a photo of a toy on the beach"] * args.batch
    common = dict(num_inference_steps=args.steps, height=args.resolution, width=args.resolution, output_type="latent")

    def gen(**kw):
        return lambda: pipe(prompts, cache, generator=torch.Generator().manual_seed(0), **common, **kw)

    base = best_of(lambda: sd(prompts, generator=torch.Generator().manual_seed(0), **common), device, args.repeat)
    print(f"generation  batch {args.batch}, {args.steps} steps, {args.resolution}px, {device} {args.dtype}")
    print(f"  {'plain SD + CFG (baseline)':<55s}{base / args.steps * 1e3:8.2f} ms/step   1.000x")
    for label, kw in [
        ("joint", dict(guidance="joint")),
        ("compositional", dict(guidance="compositional")),
        ("compositional, no shared encoder", dict(guidance="compositional", share_encoder=False)),
    ]:
        t = best_of(gen(**kw), device, args.repeat)
        print(f"  DreamCache {label:<44s}{t / args.steps * 1e3:8.2f} ms/step   {t / base:.3f}x")


def bench_caching(pipe, args, device) -> None:
    import numpy as np
    from PIL import Image

    from dreamcache.cache import HostCopies, extract_features
    from dreamcache.images import pixels_to_input, to_tensor

    n = args.cache_images
    images = [Image.new("RGB", (args.resolution, args.resolution), (i * 37 % 255, 90, 160)) for i in range(n)]
    hashes = [f"{i:064x}" for i in range(n)]
    context = pipe.encode_prompt([""])
    dtype = next(pipe.unet.parameters()).dtype

    @torch.no_grad()
    def bare():
        for start in range(0, n, args.cache_batch):
            x = to_tensor(images[start : start + args.cache_batch]).to(device, dtype)
            z = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
            t = torch.ones(z.shape[0], dtype=torch.long, device=device)
            pipe.unet(z, t, encoder_hidden_states=context.expand(z.shape[0], -1, -1))

    def host_per_reference():  # what the caching actor did: each reference's slice of each layer copied alone
        return [cache.to("cpu") for cache in pipe.build_caches(images, hashes, batch_size=args.cache_batch)]

    def host_batched():  # one copy per layer tensor per batch, pinned, on a side stream
        return pipe.build_caches(images, hashes, batch_size=args.cache_batch, to_host=True)

    base = best_of(bare, device, args.repeat)
    ours = best_of(lambda: pipe.build_caches(images, hashes, batch_size=args.cache_batch), device, args.repeat)
    print(f"caching     {n} images, batch {args.cache_batch}, {args.resolution}px")
    print(f"  bare VAE encode + full UNet (baseline) {n / base:8.1f} images/s   1.000x")
    print(f"  DreamCache build_caches               {n / ours:8.1f} images/s   {base / ours:.3f}x")
    for label, fn in (("per-reference host copies", host_per_reference), ("to_host=True (batched copy)", host_batched)):
        t = best_of(fn, device, args.repeat)
        print(f"  build_caches, {label:<24s}{n / t:8.1f} images/s   {base / t:.3f}x")
    # The asynchronous copies and the uint8 input path must give the per-reference path's bytes exactly: the
    # copy alone on one batch's features, then whole caches (equal too unless the device's kernels vary run to run).
    pixels = np.stack([np.asarray(image) for image in images[: args.cache_batch]])
    x = pixels_to_input(pixels, device, dtype)
    same_input = torch.equal(x.cpu(), to_tensor(images[: args.cache_batch]).to(dtype))
    features = extract_features(pipe.unet, pipe.vae, pipe.layers, x, context, pipe.scheduler.alphas_cumprod,
                                list(range(len(pixels))))
    copies = HostCopies(device)
    host = copies.start(features)
    copies.wait()
    same_copy = all(torch.equal(host[k][i : i + 1], v[i : i + 1].to(torch.float16).cpu())
                    for k, v in features.items() for i in range(len(pixels)))
    same = all(torch.equal(a.features[k], b.features[k]) and a.info == b.info
               for a, b in zip(host_per_reference(), host_batched()) for k in a.features)
    print(f"  identical: uint8 input on {device.type} vs the PIL path {same_input}; batched host copy vs "
          f"per-reference copies {same_copy}; whole caches {same}")


def bench_compile(pipe, cache, args, device) -> None:
    """The joint step against a bare UNet CFG step (one UNet call on [uncond, text] + the CFG combine + the
    scheduler step, nothing else), both eager, then both with the UNet compiled in place. The bare loop is the
    floor a DreamCache step can reach at this batch; at batch 1 eager, both are bound by host overhead, which
    CUDA graphs (mode "reduce-overhead") take away. Joint per-call work (text encoding, the adapters' keys and
    values) is spread over the steps."""
    batch, steps = args.batch, args.steps
    prompts = ["a photo of a toy on the beach"] * batch
    dtype = next(pipe.unet.parameters()).dtype
    context = torch.cat([pipe.encode_prompt([""] * batch), pipe.encode_prompt(prompts)])
    shape = (batch, pipe.unet.config.in_channels, args.resolution // pipe.vae_scale_factor,
             args.resolution // pipe.vae_scale_factor)
    start_latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def bare():
        pipe.scheduler.set_timesteps(steps, device=device)
        latents = start_latents * pipe.scheduler.init_noise_sigma
        for t in pipe.scheduler.timesteps:
            noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            uncond, text = noise.chunk(2)
            latents = pipe.scheduler.step(uncond + 7.5 * (text - uncond), t, latents).prev_sample
        return latents

    def joint():
        return pipe(prompts, cache, guidance="joint", num_inference_steps=steps, latents=start_latents,
                    height=args.resolution, width=args.resolution, output_type="latent")

    def line(label: str, seconds: float, base: float) -> None:
        print(f"  {label:<55s}{seconds / steps * 1e3:8.2f} ms/step   {seconds / base:.3f}x")

    print(f"compile     batch {batch}, {steps} steps, {args.resolution}px, {device} {args.dtype}, "
          f"torch.compile(unet, mode={args.compile!r})")
    eager_bare = best_of(bare, device, args.repeat)
    line("bare UNet CFG step, eager (baseline)", eager_bare, eager_bare)
    line("DreamCache joint, eager", best_of(joint, device, args.repeat), eager_bare)
    pipe.unet.compile(mode=args.compile)  # in place: the pipeline, its hooks and the bare loop all use it
    # Joint first: if the call's time runs out while the second graph compiles, the target's figure is out.
    for label, fn in (("DreamCache joint, compiled", joint), ("bare UNet CFG step, compiled", bare)):
        started = time.perf_counter()
        fn(), fn()  # compile, then CUDA graph warm-up and recording
        sync(device)
        print(f"  {label}: compile and 2 warm-up calls {time.perf_counter() - started:8.1f} s", flush=True)
        seconds = best_of(fn, device, args.repeat)
        line(label, seconds, eager_bare)
        if fn is joint:
            compiled_joint = seconds
            print(f"  DreamCache joint compiled / bare eager {compiled_joint / eager_bare:.3f}x   "
                  f"(target <= 1.1x at batch 1)", flush=True)
    print(f"  DreamCache joint compiled / bare compiled {compiled_joint / seconds:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21-random"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache-images", type=int, default=32)
    parser.add_argument("--cache-batch", type=int, default=8)
    parser.add_argument("--skip", choices=["generation", "caching"], action="append", default=[])
    parser.add_argument("--compile", metavar="MODE", help="also compare joint vs bare CFG with the UNet compiled "
                        "(torch.compile mode, e.g. reduce-overhead or default); runs last: it compiles in place")
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        components = tiny_components() if args.model == "tiny" else sd21_random_components()
    pipe = DreamCachePipeline(**components).to(device, dtype)
    args.resolution = args.resolution or pipe.default_resolution
    pipe.set_progress_bar_config(disable=True)
    # The same modules, adapters bypassed: diffusers' own pipeline is the baseline.
    sd = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    with torch.inference_mode():
        cache = pipe.cache_subject([Image.new("RGB", (args.resolution,) * 2, "red")])
        if "generation" not in args.skip:
            bench_generation(pipe, sd, cache, args, device)
        if "caching" not in args.skip:
            bench_caching(pipe, args, device)
        if args.compile:
            bench_compile(pipe, cache, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
