"""DreamCachePipeline: personalized text-to-image generation from a cached reference (spec section 4).

Usage::

    pipe = DreamCachePipeline.from_pretrained("path/or/s3://sd-2-1-base", adapter="adapter.safetensors")
    pipe.to("cuda", torch.float16)
    cache = pipe.cache_subject([image])                   # once per subject; storable, ~6 MB at 512x512
    images = pipe("a photo of a dog on the beach", cache).images
    images = pipe("a photo of a dog", reference_images=[image]).images   # the same, caching on the fly

    pipe.save_pretrained("my-model")                      # diffusers layout + my-model/adapter.safetensors
    pipe = DreamCachePipeline.from_pretrained("my-model") # finds the adapter file by itself

All guidance branches and all samples of a call go through ONE UNet call per step. A call may mix subjects
(one cache per prompt); every sample attends only to its own cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from . import storage
from .adapters import (
    AdapterError, DreamCacheAdapters, LinearCatInit, adapter_file_bytes, backbone_family, parse_adapter_file,
)
from .branching import widen_batch_after_encoder
from .errors import InvalidValue
from .cache import CacheInfo, FeatureCache, HostCopies, cache_dtype_name, extract_features, reference_seed
from .images import PreprocessMode, pixels_to_input, prepare_reference, sha256_hex
from .options import Guidance
from .layers import select_layers
from .models import load_base_model, model_fingerprint, resolve_model_dir

logger = logging.getLogger(__name__)

# Where save_pretrained writes the adapters and from_pretrained looks for them: beside model_index.json, at the
# root of the diffusers folder (the tiny model's layout too). Stock diffusers loaders ignore the file.
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ReferenceImages = Image.Image | Sequence[Image.Image | Sequence[Image.Image] | None]
CacheArg = FeatureCache | Sequence[FeatureCache | None] | None


class _Unset:
    """The default of ``cache``: omitted (an error unless ``reference_images`` is given), unlike an explicit None."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class DreamCachePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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
        self.adapter_init = adapter_init
        self.adapters: DreamCacheAdapters | None = (
            existing if existing is not None else DreamCacheAdapters(unet, init=adapter_init)
        )
        self.layers = select_layers(unet.config) if self.adapters is None else self.adapters.layers
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False

    # -- loading and saving --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        adapter: str | Literal[False] | None = None,
        torch_dtype: torch.dtype | None = None,
        scheduler=None,
        adapter_init: LinearCatInit = "default",
    ) -> DreamCachePipeline:
        """Load a diffusers SD folder (local path or s3:// prefix) and its adapters.

        ``adapter``: a file (path or URI); None loads ``<model>/adapter.safetensors`` when the folder has one (what
        ``save_pretrained`` writes), else leaves the adapters freshly initialised; False never loads one.
        """
        path = resolve_model_dir(str(model))  # mirrors an s3:// prefix once; the adapter file comes with it
        base = load_base_model(str(path), torch_dtype=torch_dtype)
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, scheduler or base.scheduler,
                   base_model=base.fingerprint, adapter_init=adapter_init)
        if adapter is None and (path / ADAPTER_WEIGHTS_NAME).is_file():
            adapter = str(path / ADAPTER_WEIGHTS_NAME)
        if adapter:
            pipe.load_adapter(adapter)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """The stock diffusers layout (the UNet saved without the adapters, so stock loaders read it) plus the
        adapters at ``<save_directory>/adapter.safetensors``, in their own precision."""
        adapters = self.adapters
        with adapters.detached() if adapters is not None else contextlib.nullcontext():
            super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        if adapters is not None:
            dtype = next(adapters.parameters()).dtype
            (Path(save_directory) / ADAPTER_WEIGHTS_NAME).write_bytes(adapter_file_bytes(adapters, dtype=dtype))

    def load_adapter(self, uri: str) -> None:
        state, metadata = parse_adapter_file(storage.read_bytes(uri), uri)
        family = backbone_family(self.unet.config)
        if metadata.get("backbone") not in (None, "custom", family) and family != "custom":
            raise AdapterError(f"{uri} holds adapters for {metadata['backbone']}, this base model is {family}")
        if self.adapters is None:  # after unload_adapter(): install fresh modules to load into
            self.adapters = DreamCacheAdapters(self.unet, self.layers, init=self.adapter_init)
        param = next(self.adapters.parameters())
        self.adapters.load_state_dict({k: v.to(param.device, param.dtype) for k, v in state.items()})

    def unload_adapter(self) -> None:
        """Remove the adapters (modules, hooks, scale buffers): the UNet is the stock model again and can be
        shared with a stock pipeline. ``load_adapter`` installs them again."""
        if self.adapters is not None:
            self.adapters.remove()
            self.adapters = None

    def set_adapter_scale(self, scale: float | Mapping[str, float]) -> None:
        """Strength of the adapters, per call-independent state like diffusers' ``set_ip_adapter_scale``.

        A float for every cached layer, or a dict layer name (``pipe.layers[i].name``) -> float, where layers the
        dict leaves out get 0. 1 is the method as published; 0 bypasses the adapters (exactly frozen SD for the
        rows with a cache, so compositional guidance becomes plain CFG); other values blend the two residuals,
        an extension the paper did not test (spec 4.2). The value lives in a buffer: a compiled UNet follows it.
        """
        self._require_adapters()
        self.adapters.set_scale(scale)

    def _require_adapters(self) -> DreamCacheAdapters:
        if self.adapters is None:
            raise AdapterError("the adapters were unloaded (unload_adapter); call load_adapter(...) first")
        return self.adapters

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    # diffusers' call-state properties, set by __call__
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- text ----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
        """Text embeddings [len(prompts), L, D]. ``clip_skip`` as diffusers: take the hidden states ``clip_skip``
        layers before the last and apply the final LayerNorm (1 = the penultimate layer)."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        # transformers 5 flattened CLIPTextModel (no .text_model); diffusers' own encode_prompt still assumes it.
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return text_model.final_layer_norm(hidden)

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
        cache_dtype: torch.dtype = torch.float16,
        to_host: bool = False,
    ) -> list[FeatureCache]:
        """One single-reference cache per image, computed in batches of ``batch_size``.

        ``references`` are PIL images (prepared here with ``preprocess``), or references already prepared at
        ``resolution`` as one contiguous uint8 array ``[N, H, W, 3]`` (RGB; ``preprocess`` then only names how
        they were prepared): no PIL round trip. ``cache_prompt`` is the text context of the caching pass: "" as
        the paper and the training data (default), or the negative prompt to reproduce the official sampler
        (ambiguity A2). ``cache_dtype``: float16 (default; the official inference runs under fp16 autocast, and it
        halves the file) or float32 (the features exactly as the UNet computed them, as in the official training).
        ``to_host=True`` returns the caches in host memory, copied with one device-to-host copy per layer tensor
        per batch (overlapping the next batch on CUDA) instead of one per reference and layer; the tensors are
        then views of one host buffer per batch. The default leaves them on the model's device.
        """
        dtype_name = cache_dtype_name(cache_dtype)
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
        copies = HostCopies(device, cache_dtype) if to_host else None
        caches: list[FeatureCache] = []
        for start in self.progress_bar(range(0, count, batch_size)):
            chunk = slice(start, start + batch_size)
            features = extract_features(
                self.unet, self.vae, self.layers, pixels_to_input(_pixels(prepared, start, start + batch_size),
                                                                  device, self.vae.dtype),
                context, self.scheduler.alphas_cumprod, [reference_seed(seed, h) for h in source_hashes[chunk]],
            )
            # One cast per layer for the whole batch; each reference's cache is a slice of it.
            features = copies.start(features) if copies else {k: v.to(cache_dtype) for k, v in features.items()}
            for i, source_hash in enumerate(source_hashes[chunk]):
                info = CacheInfo(base_model=self.base_model, resolution=size, source_hashes=(source_hash,),
                                 cache_prompt=cache_prompt, preprocess=preprocess, seed=seed, dtype=dtype_name)
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
        prompt: str | Sequence[str] | None = None,
        cache: CacheArg | _Unset = UNSET,
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
        *,
        reference_images: ReferenceImages | None = None,
        timesteps: list[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Generate ``num_images_per_prompt`` images per prompt, each personalized by its prompt's cache.

        Guidance (spec 4.2), with e_0 = no cache + negative text, e_I = cache + negative text, e_IT = cache + text:
          compositional  e_0 + image_guidance_scale * (e_I - e_0) + guidance_scale * (e_IT - e_I)   (official)
          joint          e_0 + guidance_scale * (e_IT - e_0)
        ``guidance_scale <= 1`` runs the single conditioned branch. ``cache=None`` (or a None entry) generates
        without personalization: the adapters are bypassed and guidance is plain CFG. ``share_encoder`` computes
        the encoder path once for the two negative-text branches of compositional guidance (same result).

        The subject: ``cache`` (one FeatureCache, or one per prompt: the fast path, computed once with
        ``cache_subject``) or ``reference_images`` (one PIL image or list of images per prompt, or one image for
        all prompts, like ``ip_adapter_image``; cached on the fly with ``cache_subject``'s defaults). Exactly one
        of the two.

        As diffusers' ``StableDiffusionPipeline``: ``prompt_embeds``/``negative_prompt_embeds`` instead of text
        (one row per prompt); ``timesteps`` (a custom schedule, for schedulers whose ``set_timesteps`` takes one);
        ``eta`` (DDIM; 0 as DreamBench, the official ``sample_ref.sh`` uses 1); ``guidance_rescale``
        (``rescale_noise_cfg`` against the fully conditioned branch, after guidance); ``clip_skip`` (prompt text
        only, not the negative, as diffusers); ``callback_on_step_end(pipe, step, timestep, tensors) -> dict``
        after every step, whose returned ``latents``/``prompt_embeds``/``negative_prompt_embeds`` replace the
        running ones; setting ``pipe._interrupt = True`` skips the remaining steps.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        caches = self._caches_for_call(cache, reference_images, count)
        negatives = self._negatives(negative_prompt, count)
        self._check_call(count, caches, guidance, num_images_per_prompt, num_inference_steps,
                         callback_on_step_end_tensor_inputs)
        height = height or self.default_resolution
        width = width or self.default_resolution
        if height % 8 or width % 8:
            raise InvalidValue(f"height and width must be multiples of 8, got {height}x{width}")
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._interrupt = False

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
        mode = self._mode(guidance, guidance_scale, rows)

        # Text: one row per sample; the negative only where guidance uses it.
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts, clip_skip=clip_skip)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if mode != "single":
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(negatives)  # diffusers applies clip_skip to the prompt only
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        else:
            negative_prompt_embeds = None
        if mode == "compositional":
            row_subjects = [None] * batch + rows + rows
            # share_encoder: encoder batch [negative, text]; decoder batch [negative, negative, text].
            widen = torch.cat([torch.arange(batch), torch.arange(batch), torch.arange(batch, 2 * batch)]) \
                if share_encoder else None
        elif mode == "single":
            row_subjects, widen = rows, None
        else:  # joint, or plain CFG when no sample has a cache
            row_subjects, widen = [None] * batch + rows, None
        context = self._context(mode, share_encoder, prompt_embeds, negative_prompt_embeds)
        branches = context.shape[0] // batch

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        self._num_timesteps = len(timesteps)
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise InvalidValue(f"{len(generator)} generators for {batch} images: pass one, or one per image")
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=context.dtype)
        latents = latents.to(device, context.dtype) * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        adapters = self._require_adapters() if subject_caches else None
        reference = adapters.reference(subject_caches, row_subjects) if adapters else contextlib.nullcontext()

        with reference, self._widen(widen, device):
            for i, t in enumerate(self.progress_bar(timesteps)):
                if self.interrupt:
                    continue  # as diffusers: the remaining steps are skipped, the current latents are decoded
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * branches), t)
                noise = self.unet(model_input, t, encoder_hidden_states=context).sample
                noise = self._guide(noise, mode, batch, guidance_scale, image_guidance_scale, guidance_rescale)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    new_text = outputs.pop("prompt_embeds", prompt_embeds)
                    new_negative = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if new_text is not prompt_embeds or new_negative is not negative_prompt_embeds:
                        prompt_embeds, negative_prompt_embeds = new_text, new_negative
                        context = self._context(mode, share_encoder, prompt_embeds, negative_prompt_embeds)

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
            raise InvalidValue(f"{len(negative_prompt)} negative prompts for {count} prompts")
        return list(negative_prompt)

    @staticmethod
    def _prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds) -> tuple[list[str] | None, int]:
        """The prompts as a list (None when embeddings are given) and their count."""
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidValue("pass exactly one of prompt= and prompt_embeds=")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InvalidValue("pass at most one of negative_prompt= and negative_prompt_embeds=")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise InvalidValue(
                    f"prompt_embeds must be [prompts, tokens, dim], got shape {tuple(prompt_embeds.shape)}")
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise InvalidValue(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                                   f"{tuple(prompt_embeds.shape)} must have the same shape")
            return None, prompt_embeds.shape[0]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return prompts, len(prompts)

    def _caches_for_call(self, cache: CacheArg | _Unset, reference_images: ReferenceImages | None,
                         count: int) -> list[FeatureCache | None]:
        """One cache (or None) per prompt, from ``cache`` or computed from ``reference_images``."""
        if reference_images is None:
            if cache is UNSET:
                raise InvalidValue("no subject: pass cache= (from cache_subject, the fast path) or reference_images=; "
                                   "cache=None generates without personalization")
            return list(cache) if isinstance(cache, (list, tuple)) else [cache] * count
        if cache is not UNSET:
            raise InvalidValue("pass either cache= or reference_images=, not both")
        entries = [reference_images] * count if isinstance(reference_images, Image.Image) else list(reference_images)
        if len(entries) != count:
            raise InvalidValue(f"{len(entries)} reference_images entries for {count} prompts: pass one image (for "
                               "all prompts) or one image or list of images per prompt")
        computed: dict[int, FeatureCache] = {}  # an entry repeated for several prompts is cached once
        for entry in entries:
            if entry is not None and id(entry) not in computed:
                computed[id(entry)] = self.cache_subject([entry] if isinstance(entry, Image.Image) else list(entry))
        return [None if entry is None else computed[id(entry)] for entry in entries]

    def _check_call(self, count, caches, guidance, num_images, steps, tensor_inputs) -> None:
        if not count:
            raise InvalidValue("at least one prompt is required")
        if len(caches) != count:
            raise InvalidValue(f"{len(caches)} caches for {count} prompts: pass one cache, or one per prompt")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise InvalidValue(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        if guidance not in ("compositional", "joint"):
            raise InvalidValue(f"guidance must be 'compositional' or 'joint', got {guidance!r}")
        if num_images < 1 or steps < 1:
            raise InvalidValue("num_images_per_prompt and num_inference_steps must be >= 1")
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
    def _context(mode: str, share_encoder: bool, text: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """The UNet's text batch: [text] | [negative, text] | [negative, negative, text] (no shared encoder)."""
        if mode == "single":
            return text
        if mode == "compositional" and not share_encoder:
            return torch.cat([negative, negative, text])
        return torch.cat([negative, text])

    @staticmethod
    def _guide(noise: torch.Tensor, mode: str, batch: int, scale: float, image_scale: float,
               rescale: float = 0.0) -> torch.Tensor:
        if mode == "single":
            return noise
        if mode == "compositional":
            e_0, e_i, e_it = noise.split(batch)
            guided = e_0 + image_scale * (e_i - e_0) + scale * (e_it - e_i)
        else:
            e_0, e_it = noise.split(batch)
            guided = e_0 + scale * (e_it - e_0)
        if rescale > 0.0:  # as diffusers: against the fully conditioned prediction (here cache + text)
            guided = rescale_noise_cfg(guided, e_it, guidance_rescale=rescale)
        return guided

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
