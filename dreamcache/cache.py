"""The feature cache: extraction from the frozen UNet (spec section 1) and its file format.

A reference image is VAE-encoded (posterior sample), noised to t=1, and passed once through the UNet with the
empty prompt; the *inputs* of the cached transformer blocks are kept and the pass stops right after the last
one. One safetensors object per subject: tensor names are the blocks' diffusers paths, values
``[n_refs, C, H, W]`` in fp16 (default) or fp32, metadata ties the cache to its base model, timestep, prompt,
resolution and sources, and names the tensors' dtype (``dtype``; absent in older files, which are fp16).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError

# The cache file's metadata lives in a torch-free module: the caching job's CPU stages read headers with it.
from .cache_info import (  # noqa: F401 - re-exported: dreamcache.cache is the public home of these names
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    CACHE_TIMESTEP,
    CacheError,
    CacheInfo,
    library_version,
)
from .layers import CachedLayer
from .safetensors_header import read_metadata


def cache_dtype_name(dtype: torch.dtype) -> str:
    """The name a cache file records for its tensors' dtype (one of CACHE_DTYPES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in CACHE_DTYPES:
        raise ValueError(f"a cache is stored as torch.float16 or torch.float32, not {dtype}")
    return name


@dataclass
class FeatureCache:
    """One subject's cached features: layer name -> [n_refs, C, H, W]."""

    features: dict[str, torch.Tensor]
    info: CacheInfo

    @property
    def num_references(self) -> int:
        return next(iter(self.features.values())).shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FeatureCache:
        return FeatureCache({k: v.to(device=device, dtype=dtype) for k, v in self.features.items()}, self.info)

    @classmethod
    def concat(cls, caches: Sequence[FeatureCache], subject_id: str = "") -> FeatureCache:
        """A multi-reference subject: the references' tokens concatenated per layer (an extension, spec 4.3)."""
        if not caches:
            raise ValueError("no caches to concatenate")
        first = caches[0].info
        for cache in caches[1:]:
            if cache.info.base_model != first.base_model or cache.features.keys() != caches[0].features.keys():
                raise CacheError("caches made with different base models or layers cannot be combined")
            if cache.info.dtype != first.dtype:
                raise CacheError(f"caches stored as {first.dtype} and {cache.info.dtype} cannot be combined")
        features = {k: torch.cat([c.features[k] for c in caches]) for k in caches[0].features}
        hashes = tuple(h for c in caches for h in c.info.source_hashes)
        info = CacheInfo(**{**asdict(first), "source_hashes": hashes, "subject_id": subject_id or first.subject_id})
        return cls(features, info)

    # -- file format ---------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        dtype = getattr(torch, self.info.dtype)  # the dtype the metadata names, whatever the tensors are now in
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.features.items()}
        return safetensors.torch.save(tensors, metadata=self.info.to_metadata())

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        source: str,
        layers: Sequence[CachedLayer] | None = None,
        base_model: str | None = None,
    ) -> FeatureCache:
        """Parse and validate a cache file; with ``layers``/``base_model`` also check it fits a pipeline."""

        try:
            tensors = safetensors.torch.load(data)
            meta = read_metadata(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CacheError(f"{source}: not a readable cache file (truncated or corrupt: {exc})") from None
        cache = cls(tensors, CacheInfo.from_file_metadata(meta, source))
        stored = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        if tensors and stored != [cache.info.dtype]:
            raise CacheError(f"{source}: metadata says {cache.info.dtype} tensors, the file holds {stored}")
        bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if bad:  # NaN/inf features render all-black images without any error: refuse the file at load
            raise CacheError(f"{source}: cache tensor(s) {bad[:3]} hold NaN or inf values (a corrupt cache; "
                             "recompute it)", kind="invalid")
        cache.validate(source, layers, base_model)
        return cache

    def validate(self, source: str, layers: Sequence[CachedLayer] | None = None, base_model: str | None = None) -> None:
        if base_model is not None and self.info.base_model != base_model:
            raise CacheError(
                f"{source}: cache was made with base model {self.info.base_model}, this pipeline's base model is "
                f"{base_model}; recompute the cache with this model"
            )
        if not self.features:
            raise CacheError(f"{source}: cache holds no tensors")
        counts = {t.shape[0] if t.ndim == 4 else -1 for t in self.features.values()}
        if len(counts) != 1 or counts == {-1}:
            raise CacheError(f"{source}: tensors must be [n_refs, C, H, W] with one n_refs for all layers")
        if self.info.source_hashes and len(self.info.source_hashes) != counts.pop():
            raise CacheError(f"{source}: metadata names {len(self.info.source_hashes)} references, tensors hold another count")
        if layers is None:
            return
        names = [layer.name for layer in layers]
        if sorted(names) != sorted(self.features):
            raise CacheError(f"{source}: cache layers {sorted(self.features)} do not match the model's {names}")
        for layer in layers:
            channels = self.features[layer.name].shape[1]
            if channels != layer.channels:
                raise CacheError(f"{source}: {layer.name} has {channels} channels, the model's layer has {layer.channels}")
        # Spatial sizes must follow the UNet's stages: derive the latent size from the finest layer, check all.
        finest = min(layers, key=lambda layer: layer.downsample)
        height, width = self.features[finest.name].shape[2:]
        latent = (height * finest.downsample, width * finest.downsample)
        for layer in layers:
            got = tuple(self.features[layer.name].shape[2:])
            if got != layer.spatial(*latent):
                raise CacheError(f"{source}: {layer.name} is {got[0]}x{got[1]}, expected {layer.spatial(*latent)} "
                                 f"for a {latent[0]}x{latent[1]} latent")


def reference_seed(seed: int, source_hash: str) -> int:
    """Per-reference noise seed: a cache depends on its image and seed only, not on how references are batched."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source_hash}".encode()).digest()[:8], "little") & (2**63 - 1)


def one_host_buffer(
    features: dict[str, torch.Tensor], pin: bool = False, non_blocking: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors copied into ONE host buffer (same dtype), one copy each: name -> a contiguous view of it.

    ``pin`` takes page-locked memory (CUDA only: a CPU-only torch cannot pin), which ``non_blocking`` copies from
    a CUDA device need to be asynchronous; the views must then not be read before the copying stream is done.
    """
    dtypes = {v.dtype for v in features.values()}
    if len(dtypes) != 1:
        raise ValueError(f"one host buffer holds one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.empty(sum(v.numel() for v in features.values()), dtype=dtypes.pop(), pin_memory=pin)
    host, offset = {}, 0
    for name, tensor in features.items():
        host[name] = flat[offset : offset + tensor.numel()].view(tensor.shape)
        host[name].copy_(tensor, non_blocking=non_blocking)
        offset += tensor.numel()
    return host


class HostCopies:
    """Brings each batch's features to host memory as fp16: ONE device-to-host copy per cached layer tensor
    for the whole batch, into one pinned buffer per batch, on a side stream of its own.

    Copying each reference's slice of each layer separately costs a blocking copy (and a device sync) per
    slice: thousands per batch at SD size. Here a batch's copies are queued without blocking and overlap the
    next batch's VAE and UNet kernels; :meth:`wait` returns once every buffer is filled. The returned tensors
    must not be read before :meth:`wait`. On the CPU the features are already on the host: this reduces to the
    fp16 cast the per-reference path made, with no copy.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float16) -> None:
        self.device = torch.device(device)
        self.dtype = dtype  # the caches' precision (fp16 by default; fp32 keeps the features unrounded)
        self.cuda = self.device.type == "cuda"
        # A stream of its own: the copies of batch k then run beside the kernels of batch k + 1.
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def start(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Queue the copies of one batch's features (layer name -> [N, C, h, w]); host fp16 tensors back."""
        half = {k: v.to(self.dtype) for k, v in features.items()}
        if self.device.type == "cpu":
            return half
        if not self.cuda:
            return one_host_buffer(half)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the features must be computed first
        with torch.cuda.stream(self.stream):
            host = one_host_buffer(half, pin=True, non_blocking=True)
        for tensor in half.values():  # the caching allocator must not reuse their memory before the copies end
            tensor.record_stream(self.stream)
        return host

    def wait(self) -> None:
        if self.cuda:
            self.stream.synchronize()


class _StopForward(Exception):
    """Raised from the last cached block's pre-hook: the rest of the UNet is not needed."""


@torch.no_grad()
def extract_features(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    layers: Sequence[CachedLayer],
    images: torch.Tensor,
    prompt_embeds: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    seeds: Sequence[int],
    timestep: int = CACHE_TIMESTEP,
) -> dict[str, torch.Tensor]:
    """One batched caching pass: images [N, 3, H, W] in [-1, 1] -> layer name -> [N, C, h, w].

    ``prompt_embeds`` is the text context, [1, L, D] (broadcast) or [N, L, D]. Every image draws its VAE
    posterior sample and its t=1 noise from its own seed, so results do not depend on batch composition.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    if len(seeds) != images.shape[0]:
        raise ValueError("one seed per image is required")
    posterior = vae.encode(images.to(device=device, dtype=vae.dtype)).latent_dist
    shape = posterior.mean.shape[1:]
    eps, noise = [], []
    for seed in seeds:  # CPU generators: identical noise on every device
        gen = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn(shape, generator=gen))
        noise.append(torch.randn(shape, generator=gen))
    latents = posterior.mean + posterior.std * torch.stack(eps).to(device, posterior.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (latents - shift) * vae.config.scaling_factor
    abar = alphas_cumprod[timestep].to(torch.float64)
    noisy = abar.sqrt().item() * latents.float() + (1 - abar).sqrt().item() * torch.stack(noise).to(device)

    captured: dict[str, torch.Tensor] = {}
    last = layers[-1].name  # layers come in forward order; the UNet is cut right after this block's input

    def capture(name: str):
        def hook(module, args, kwargs):
            captured[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            if name == last:
                raise _StopForward
        return hook

    handles = [unet.get_submodule(layer.name).register_forward_pre_hook(capture(layer.name), with_kwargs=True)
               for layer in layers]
    context = prompt_embeds.to(device, dtype)
    if context.shape[0] == 1:
        context = context.expand(images.shape[0], -1, -1)
    t = torch.full((images.shape[0],), timestep, device=device, dtype=torch.long)
    try:
        unet(noisy.to(dtype), t, encoder_hidden_states=context)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer.name for layer in layers if layer.name not in captured]
    if missing:
        raise RuntimeError(f"the UNet forward never reached layers {missing}")
    return captured
