"""Convert the authors' released adapter checkpoint (``cross_attention-*.pt``) to a DreamCache adapter file.

The official loaders prefix each key with ``model.`` and call ``load_state_dict(strict=False)``, so a wrong key
fails silently there; this converter asserts every one of the 45 keys and shapes (spec section 8). The file is
read with ``torch.load(weights_only=True)``: arbitrary pickled objects are never executed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch
from safetensors.torch import save

from .adapters import AdapterError, adapter_metadata

# LDM block -> diffusers block; channels of each (identical for SD 1.5 and SD 2.1-base).
OFFICIAL_BLOCKS = {
    "middle_block.1": ("mid_block.attentions.0", 1280),
    "output_blocks.4.1": ("up_blocks.1.attentions.1", 1280),
    "output_blocks.6.1": ("up_blocks.2.attentions.0", 640),
    "output_blocks.8.1": ("up_blocks.2.attentions.2", 640),
    "output_blocks.10.1": ("up_blocks.3.attentions.1", 320),
}
HEADS = {"sd21": {1280: 20, 640: 10, 320: 5}, "sd15": {1280: 8, 640: 8, 320: 8}}


def _suffix_shapes(c: int) -> dict[str, tuple[int, ...]]:
    return {
        "attn_mem.to_q.weight": (c, c),
        "attn_mem.to_k.weight": (c, c),
        "attn_mem.to_v.weight": (c, c),
        "attn_mem.to_out.0.weight": (c, c),
        "attn_mem.to_out.0.bias": (c,),
        "norm2_mem.weight": (c,),
        "norm2_mem.bias": (c,),
        # Input columns 0..C-1 multiply the self-attention output, C..2C-1 the reference attention: no reorder.
        "linear_cat.weight": (c, 2 * c),
        "linear_cat.bias": (c,),
    }


def official_key_shapes() -> dict[str, tuple[int, ...]]:
    """The 45 keys of an official checkpoint, as saved (``diffusion_model.`` prefix), with their shapes."""
    return {
        f"diffusion_model.{ldm}.transformer_blocks.0.{suffix}": shape
        for ldm, (_, c) in OFFICIAL_BLOCKS.items()
        for suffix, shape in _suffix_shapes(c).items()
    }


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        out[key if key.startswith("diffusion_model.") else f"diffusion_model.{key}"] = value
    return out


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> diffusers names, asserting the exact key set and every shape."""
    state = _normalise_keys(state)
    expected = official_key_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"not an official DreamCache adapter checkpoint: {len(missing)} keys missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    converted = {}
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AdapterError(f"{key}: expected shape {shape}, got {got}")
        block = key.removeprefix("diffusion_model.").split(".transformer_blocks.")[0]
        converted[key.removeprefix("diffusion_model.").replace(block, OFFICIAL_BLOCKS[block][0], 1)] = value
    return converted


def convert_official_checkpoint(data: bytes, backbone: str = "sd21", dtype: torch.dtype = torch.float16) -> bytes:
    """Bytes of a ``cross_attention-*.pt`` -> bytes of a DreamCache adapter safetensors file.

    The released checkpoint is for SD 2.1-base; ``backbone`` only sets the metadata (the shapes are identical
    for SD 1.5, whose head split differs: 8 heads instead of C/64).
    """
    if backbone not in HEADS:
        raise ValueError(f"backbone must be one of {sorted(HEADS)}, got {backbone!r}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or malicious pickles
        raise AdapterError(f"cannot read the checkpoint safely with weights_only=True: {exc}") from None
    if not isinstance(state, Mapping):
        raise AdapterError(f"checkpoint holds a {type(state).__name__}, expected a dict of tensors")
    converted = {k: v.to(dtype).contiguous() for k, v in convert_official_state(state).items()}
    layers = [diffusers for diffusers, _ in OFFICIAL_BLOCKS.values()]
    channels = [c for _, c in OFFICIAL_BLOCKS.values()]
    heads = [HEADS[backbone][c] for c in channels]
    metadata = adapter_metadata(backbone, layers, channels, heads, converted_from="official cross_attention checkpoint")
    return save(converted, metadata=metadata)
