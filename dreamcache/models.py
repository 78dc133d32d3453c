"""Base models: load a Stable Diffusion folder (local or s3://), fingerprint it, or build the tiny offline one.

Nothing here downloads from a hub: real weights come from a diffusers-format folder on disk or under an
``s3://`` prefix (mirrored once into a local cache folder, then reused). The tiny model is a random-weight SD
with the same block layout as SD 1.5/2.1 (so the same five layers are cached) and an offline byte-level CLIP
tokenizer; it is the embedded default of the demo and the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import storage
from .adapters import DreamCacheAdapters, adapter_file_bytes
from .errors import DreamCacheError

logger = logging.getLogger(__name__)

TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 4, so latents are 16x16


def ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """The official sampler (spec 4.1): DDIM, leading spacing with offset 1, alpha_prev at the end = abar_0, no clipping."""
    base = dict(config or {})
    base.update(
        beta_start=base.get("beta_start", 0.00085),
        beta_end=base.get("beta_end", 0.012),
        beta_schedule=base.get("beta_schedule", "scaled_linear"),
        steps_offset=1,
        timestep_spacing="leading",
        set_alpha_to_one=False,
        clip_sample=False,  # diffusers clips x0 by default; the official DDIM never does
    )
    return DDIMScheduler.from_config(base)


# -- loading --------------------------------------------------------------------------------------------------
def resolve_model_dir(uri: str) -> Path:
    """A local diffusers folder for ``uri``: the folder itself, or an s3:// prefix mirrored into the local cache."""
    if storage.is_s3(uri):
        target = storage.local_cache_dir_for(uri)
        logger.info("mirroring %s into %s", uri, target)
        storage.download_prefix(uri, target)
        path = target
    else:
        path = Path(storage.parse_uri(uri).path)
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{uri} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    return path


@dataclass
class BaseModel:
    """The frozen components DreamCache needs, and the fingerprint that ties caches to them."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    fingerprint: str


WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_weights(path: Path, uri: str) -> None:
    """Refuse, before loading anything, a model whose weights are not all safetensors: pickle weights
    (``.bin``, ``.ckpt``) can run code when loaded, and the libraries' own refusal is a long traceback."""

    for folder in WEIGHT_FOLDERS:
        files = [f for f in (path / folder).iterdir() if f.is_file()] if (path / folder).is_dir() else []
        if any(f.name.endswith(".safetensors") for f in files):
            continue
        pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES))
        found = f"pickle weights {pickles}" if pickles else "no weights"
        raise DreamCacheError(f"{uri}: {folder}/ has {found}; only .safetensors weights are loaded "
                              "(convert them with save_pretrained(safe_serialization=True))", kind="unsupported")


def load_base_model(uri: str, torch_dtype: torch.dtype | None = None) -> BaseModel:
    path = resolve_model_dir(uri)
    check_safetensors_weights(path, uri)
    # use_safetensors=True: never fall back to a pickle file next to the safetensors one.
    kwargs: dict = {"use_safetensors": True, **({"torch_dtype": torch_dtype} if torch_dtype is not None else {})}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return BaseModel(unet, vae, text_encoder, tokenizer, ddim_scheduler(scheduler_config),
                     model_fingerprint(unet, vae, text_encoder))


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """A short, stable id of the weights a cache depends on (UNet, VAE, text encoder).

    Hashing every byte of a 5 GB model would cost seconds per load; a strided sample of every tensor plus all
    configs and shapes tells different checkpoints apart just as well. Values are rounded to fp16 first so an
    fp32 and an fp16 load of the same weights share one fingerprint.
    """
    digest = hashlib.sha256()
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 257)
            sample = flat[::step][:257].to("cpu", torch.float16).float().numpy().tobytes()
            digest.update(sample)
    return digest.hexdigest()[:16]


# -- the tiny offline model -----------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def offline_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory (no vocab download): 256 byte symbols, their word-end forms."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_components(seed: int = 0) -> dict:
    """Random-weight SD components with SD's block layout (3 cross-attention stages + 1 plain, 2 layers each)."""
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        return _tiny_components()


def _tiny_components() -> dict:
    tokenizer = offline_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32,
    ))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": ddim_scheduler()}


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder (loadable by StableDiffusionPipeline) plus random adapters."""
    from diffusers import StableDiffusionPipeline


    out = Path(out_dir)
    components = tiny_components(seed)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    adapters = DreamCacheAdapters(components["unet"])
    (out / "adapter.safetensors").write_bytes(adapter_file_bytes(adapters, dtype=torch.float32))
    adapters.remove()
    return out
