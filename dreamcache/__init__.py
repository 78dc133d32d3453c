"""DreamCache: finetuning-free personalized generation from cached reference features (CVPR 2025), on diffusers.

The public names are importable from the package (``from dreamcache import DreamCachePipeline``) but loaded on
first use (PEP 562): ``import dreamcache`` alone, or a torch-free submodule such as ``dreamcache.cache_info`` or
``dreamcache.storage``, never imports torch, diffusers or transformers, so CLI ``--help`` and the CPU-only stages
of the Ray jobs stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "DreamCachePipeline": "pipeline",
    "OFFICIAL_NEGATIVE_PROMPT": "dreambench",
    "ADAPTER_WEIGHTS_NAME": "pipeline",
    "FeatureCache": "cache",
    "extract_features": "cache",
    "CacheInfo": "cache_info",
    "CacheError": "cache_info",
    "CacheStore": "cache_store",
    "read_cache_info": "cache_store",
    "DreamCacheAdapters": "adapters",
    "AdapterError": "adapters",
    "CachedLayer": "layers",
    "select_layers": "layers",
    "convert_official_checkpoint": "convert",
    "load_base_model": "models",
    "write_tiny_model": "models",
    "ModelSpec": "runtime",
    "load_pipeline": "runtime",
    "pick_device": "runtime",
    "pick_dtype": "runtime",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; at runtime the names load lazily below
    from .adapters import AdapterError, DreamCacheAdapters
    from .cache import FeatureCache, extract_features
    from .cache_info import CacheError, CacheInfo
    from .cache_store import CacheStore, read_cache_info
    from .convert import convert_official_checkpoint
    from .dreambench import OFFICIAL_NEGATIVE_PROMPT
    from .layers import CachedLayer, select_layers
    from .models import load_base_model, write_tiny_model
    from .pipeline import ADAPTER_WEIGHTS_NAME, DreamCachePipeline
    from .runtime import ModelSpec, load_pipeline, pick_device, pick_dtype


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dreamcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
