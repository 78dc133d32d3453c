"""What a feature cache was made from, as stored in its safetensors metadata; no torch, so that CPU-only stages
(the caching job's read stage, listings) can check a cache's header without loading the model stack."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

from .errors import DreamCacheError

CACHE_FORMAT = "dreamcache-cache"
CACHE_FORMAT_VERSION = "1"
CACHE_TIMESTEP = 1  # 0-based DDPM index: the second-least-noisy level (sigma 0.041), as the official code
# The dtypes a cache file may store its tensors in; files written before the field existed are float16.
CACHE_DTYPES = ("float16", "float32")


class CacheError(DreamCacheError, ValueError):
    """A cache that cannot be used: unreadable, malformed, or made with another base model.

    Still a ValueError, so that callers written before the DreamCacheError family keep working."""

    kind = "incompatible"


def library_version() -> str:
    try:
        return version("dreamcache")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class CacheInfo:
    """What a cache was made from; stored as safetensors metadata (all strings)."""

    base_model: str  # fingerprint of the UNet/VAE/text encoder weights
    resolution: tuple[int, int]  # (height, width) of the preprocessed reference in pixels
    source_hashes: tuple[str, ...]  # sha256 of each reference image's bytes, in cache order
    timestep: int = CACHE_TIMESTEP
    cache_prompt: str = ""
    preprocess: str = "resize"
    seed: int = 0
    subject_id: str = ""
    dtype: str = "float16"  # of the stored tensors: float16 (default, as the official fp16 inference) or float32
    library_version: str = field(default_factory=library_version)
    format_version: str = CACHE_FORMAT_VERSION

    def fingerprint(self) -> str:
        """A short id of what the cache was made from (model, images, settings); not the library version,
        which does not change the features."""

        made_from = {k: v for k, v in asdict(self).items() if k not in ("library_version", "subject_id")}
        return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_metadata(self) -> dict[str, str]:
        data = asdict(self)
        meta = {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in data.items()}
        meta["format"] = CACHE_FORMAT
        return meta

    @classmethod
    def from_file_metadata(cls, meta: Mapping[str, str], source: str) -> CacheInfo:
        """The info of a cache file's metadata; CacheError if it is not a DreamCache cache this library reads."""
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{source}: not a DreamCache feature cache (format={meta.get('format')!r})")
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheError(f"{source}: cache format version {meta.get('format_version')!r} is not supported "
                             f"(this library reads version {CACHE_FORMAT_VERSION})")
        try:
            info = cls.from_metadata(meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"{source}: cache metadata is incomplete ({exc})") from None
        if info.dtype not in CACHE_DTYPES:
            raise CacheError(f"{source}: cache dtype {info.dtype!r} is not one of {list(CACHE_DTYPES)}")
        return info

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> CacheInfo:
        return cls(
            base_model=meta["base_model"],
            resolution=tuple(json.loads(meta["resolution"])),
            source_hashes=tuple(json.loads(meta["source_hashes"])),
            timestep=int(meta["timestep"]),
            cache_prompt=meta["cache_prompt"],
            preprocess=meta["preprocess"],
            seed=int(meta["seed"]),
            subject_id=meta.get("subject_id", ""),
            dtype=meta.get("dtype", "float16"),
            library_version=meta["library_version"],
            format_version=meta["format_version"],
        )


