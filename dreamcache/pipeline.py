"""DreamCachePipeline: personalized text-to-image generation from a cached reference (spec section 4).

Usage::

    pipe = DreamCachePipeline.from_pretrained("path/or/s3://sd-2-1-base", adapter="adapter.safetensors")
    pipe.to("cuda", torch.float16)
    cache = pipe.cache_subject([image])                   # once per subject; storable, ~6 MB at 512x512
    images = pipe("a photo of a dog on the beach", cache).images

All guidance branches and all samples of a call go through ONE UNet call per step. A call may mix subjects
(one cache per prompt); every sample attends only to its own cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from . import storage
from .adapters import AdapterError, DreamCacheAdapters, LinearCatInit, backbone_family, parse_adapter_file
from .branching import widen_batch_after_encoder
from .cache import CacheInfo, FeatureCache, HostCopies, extract_features, reference_seed
from .images import PreprocessMode, pixels_to_input, prepare_reference, sha256_hex
from .models import load_base_model, model_fingerprint

logger = logging.getLogger(__name__)

Guidance = Literal["compositional", "joint"]
# The official sampler's negative prompt (spec 4.1); pass it explicitly to reproduce the official scripts.
OFFICIAL_NEGATIVE_PROMPT = "Open mouth, tongue out, teeth visible, bad photo, low quality, blurred, deformed"


class DreamCachePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        base_model: str | None = None,
        adapter_init: LinearCatInit = "default",
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        existing = getattr(unet, "dreamcache_adapters", None)
        # The fingerprint must describe the frozen model only, so take it before the adapters exist.
        self.base_model = base_model or model_fingerprint(unet, vae, text_encoder)
        self.adapters = existing if existing is not None else DreamCacheAdapters(unet, init=adapter_init)
        self.layers = self.adapters.layers
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        adapter: str | None = None,
        torch_dtype: torch.dtype | None = None,
        scheduler=None,
        adapter_init: LinearCatInit = "default",
    ) -> DreamCachePipeline:
        """Load a diffusers SD folder (local path or s3:// prefix) and, optionally, an adapter file (path or URI)."""
        base = load_base_model(model, torch_dtype=torch_dtype)
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, scheduler or base.scheduler,
                   base_model=base.fingerprint, adapter_init=adapter_init)
        if adapter is not None:
            pipe.load_adapter(adapter)
        return pipe

    def load_adapter(self, uri: str) -> None:
        state, metadata = parse_adapter_file(storage.read_bytes(uri), uri)
        family = backbone_family(self.unet.config)
        if metadata.get("backbone") not in (None, "custom", family) and family != "custom":
            raise AdapterError(f"{uri} holds adapters for {metadata['backbone']}, this base model is {family}")
        param = next(self.adapters.parameters())
        self.adapters.load_state_dict({k: v.to(param.device, param.dtype) for k, v in state.items()})

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    # -- text ----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    # -- caching -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def build_caches(
        self,
        references: Sequence[Image.Image] | np.ndarray,
        source_hashes: Sequence[str] | None = None,
        *,
        resolution: int | tuple[int, int] | None = None,
        preprocess: PreprocessMode = "resize",
        cache_prompt: str = "",
        seed: int = 0,
        batch_size: int = 8,
        to_host: bool = False,
    ) -> list[FeatureCache]:
        """One single-reference cache per image, computed in batches of ``batch_size``.

        ``references`` are PIL images (prepared here with ``preprocess``), or references already prepared at
        ``resolution`` as one contiguous uint8 array ``[N, H, W, 3]`` (RGB; ``preprocess`` then only names how
        they were prepared): no PIL round trip. ``cache_prompt`` is the text context of the caching pass: "" as
        the paper and the training data (default), or the negative prompt to reproduce the official sampler
        (ambiguity A2). ``to_host=True`` returns the caches in host memory, copied with one device-to-host copy
        per layer tensor per batch (overlapping the next batch on CUDA) instead of one per reference and layer;
        the tensors are then views of one host buffer per batch. The default leaves them on the model's device.
        """
        resolution = resolution or self.default_resolution
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if isinstance(references, np.ndarray):
            if references.dtype != np.uint8 or references.ndim != 4 or references.shape[1:] != (*size, 3):
                raise ValueError(f"prepared references must be uint8 [N, {size[0]}, {size[1]}, 3], "
                                 f"got {references.dtype} {references.shape}")
            prepared: Sequence[Image.Image] | np.ndarray = references
            count = references.shape[0]
        else:
            prepared = [prepare_reference(image, size, preprocess) for image in references]
            count = len(prepared)
        if source_hashes is None:  # an RGB image's bytes are those of its [H, W, 3] uint8 array: same hash
            source_hashes = [sha256_hex(reference.tobytes()) for reference in prepared]
        if len(source_hashes) != count:
            raise ValueError("one source hash per reference image is required")
        context = self.encode_prompt([cache_prompt])
        device = next(self.unet.parameters()).device
        copies = HostCopies(device) if to_host else None
        caches: list[FeatureCache] = []
        for start in self.progress_bar(range(0, count, batch_size)):
            chunk = slice(start, start + batch_size)
            features = extract_features(
                self.unet, self.vae, self.layers, pixels_to_input(_pixels(prepared, start, start + batch_size),
                                                                  device, self.vae.dtype),
                context, self.scheduler.alphas_cumprod, [reference_seed(seed, h) for h in source_hashes[chunk]],
            )
            # One fp16 cast per layer for the whole batch; each reference's cache is a slice of it.
            features = copies.start(features) if copies else {k: v.to(torch.float16) for k, v in features.items()}
            for i, source_hash in enumerate(source_hashes[chunk]):
                info = CacheInfo(base_model=self.base_model, resolution=size, source_hashes=(source_hash,),
                                 cache_prompt=cache_prompt, preprocess=preprocess, seed=seed)
                caches.append(FeatureCache({k: v[i : i + 1] for k, v in features.items()}, info))
        if copies:
            copies.wait()
        return caches

    def cache_subject(self, references: Sequence[Image.Image], subject_id: str = "", **kwargs) -> FeatureCache:
        """One subject's cache from one or more reference images (several: tokens concatenated per layer)."""
        return FeatureCache.concat(self.build_caches(references, **kwargs), subject_id=subject_id)

    def load_cache(self, uri: str) -> FeatureCache:
        """Read a cache file and check it was made with this pipeline's base model and layers."""
        return FeatureCache.from_bytes(storage.read_bytes(uri), uri, self.layers, self.base_model)

    # -- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        cache: FeatureCache | Sequence[FeatureCache | None] | None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 0.4,
        guidance: Guidance = "compositional",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        share_encoder: bool = True,
        return_dict: bool = True,
    ):
        """Generate ``num_images_per_prompt`` images per prompt, each personalized by its prompt's cache.

        Guidance (spec 4.2), with e_0 = no cache + negative text, e_I = cache + negative text, e_IT = cache + text:
          compositional  e_0 + image_guidance_scale * (e_I - e_0) + guidance_scale * (e_IT - e_I)   (official)
          joint          e_0 + guidance_scale * (e_IT - e_0)
        ``guidance_scale <= 1`` runs the single conditioned branch. ``cache=None`` (or a None entry) generates
        without personalization: the adapters are bypassed and guidance is plain CFG. ``share_encoder`` computes
        the encoder path once for the two negative-text branches of compositional guidance (same result).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        caches = list(cache) if isinstance(cache, (list, tuple)) else [cache] * len(prompts)
        negatives = self._negatives(negative_prompt, len(prompts))
        self._check_call(prompts, caches, guidance, num_images_per_prompt, num_inference_steps)
        height = height or self.default_resolution
        width = width or self.default_resolution
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")

        # Distinct caches once each; every sample row points at its prompt's cache (or None).
        unique: dict[int, int] = {}
        subject_caches: list[dict[str, torch.Tensor]] = []
        subject_of_prompt: list[int | None] = []
        for c in caches:
            if c is None:
                subject_of_prompt.append(None)
                continue
            if id(c) not in unique:
                unique[id(c)] = len(subject_caches)
                subject_caches.append(c.features)
            subject_of_prompt.append(unique[id(c)])
        rows = [s for s in subject_of_prompt for _ in range(num_images_per_prompt)]
        batch = len(rows)
        device = self._execution_device

        text = self.encode_prompt([p for p in prompts for _ in range(num_images_per_prompt)])
        mode = self._mode(guidance, guidance_scale, rows)
        if mode == "single":
            context, row_subjects, widen = text, rows, None
        else:
            negative = self.encode_prompt([n for n in negatives for _ in range(num_images_per_prompt)])
            context = torch.cat([negative, text])
            if mode == "compositional":
                row_subjects = [None] * batch + rows + rows
                if share_encoder:
                    # Encoder batch [negative, text]; decoder batch [negative, negative, text].
                    widen = torch.cat([torch.arange(batch), torch.arange(batch), torch.arange(batch, 2 * batch)])
                else:
                    context, widen = torch.cat([negative, negative, text]), None
            else:  # joint, or plain CFG when no sample has a cache
                row_subjects, widen = [None] * batch + rows, None
        branches = context.shape[0] // batch

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: pass one, or one per image")
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=context.dtype)
        latents = latents.to(device, context.dtype) * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

        with self.adapters.reference(subject_caches, row_subjects), self._widen(widen, device):
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * branches), t)
                noise = self.unet(model_input, t, encoder_hidden_states=context).sample
                noise = self._guide(noise, mode, batch, guidance_scale, image_guidance_scale)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # -- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _negatives(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
        if negative_prompt is None:
            return [""] * count
        if isinstance(negative_prompt, str):
            return [negative_prompt] * count
        if len(negative_prompt) != count:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {count} prompts")
        return list(negative_prompt)

    def _check_call(self, prompts, caches, guidance, num_images, steps) -> None:
        if not prompts:
            raise ValueError("at least one prompt is required")
        if len(caches) != len(prompts):
            raise ValueError(f"{len(caches)} caches for {len(prompts)} prompts: pass one cache, or one per prompt")
        if guidance not in ("compositional", "joint"):
            raise ValueError(f"guidance must be 'compositional' or 'joint', got {guidance!r}")
        if num_images < 1 or steps < 1:
            raise ValueError("num_images_per_prompt and num_inference_steps must be >= 1")
        for i, c in enumerate(caches):
            if c is not None and not isinstance(c, FeatureCache):
                raise TypeError(f"cache {i} is a {type(c).__name__}, expected a FeatureCache")
            if c is not None:
                c.validate(f"cache {i}", self.layers, self.base_model)

    @staticmethod
    def _mode(guidance: Guidance, guidance_scale: float, rows: list[int | None]) -> str:
        if guidance_scale <= 1.0:
            return "single"
        if all(r is None for r in rows):
            return "cfg"  # nothing to personalize: compositional and joint both reduce to plain CFG
        return guidance

    @staticmethod
    def _guide(noise: torch.Tensor, mode: str, batch: int, scale: float, image_scale: float) -> torch.Tensor:
        if mode == "single":
            return noise
        if mode == "compositional":
            e_0, e_i, e_it = noise.split(batch)
            return e_0 + image_scale * (e_i - e_0) + scale * (e_it - e_i)
        e_0, e_it = noise.split(batch)
        return e_0 + scale * (e_it - e_0)

    def _widen(self, index: torch.Tensor | None, device: torch.device):
        if index is None:
            return contextlib.nullcontext()
        return widen_batch_after_encoder(self.unet, index.to(device))


def _pixels(prepared: Sequence[Image.Image] | np.ndarray, start: int, stop: int) -> np.ndarray:
    """References start..stop as one uint8 [n, H, W, 3] array: a view of a prepared array, or PIL images stacked
    (one batch at a time, so a long list is never held twice)."""
    if isinstance(prepared, np.ndarray):
        return prepared[start:stop]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in prepared[start:stop]])
