"""Convert the authors' released adapter checkpoint (``cross_attention-*.pt``) to a DreamCache adapter file.

The official loaders prefix each key with ``model.`` and call ``load_state_dict(strict=False)``, so a wrong key
fails silently there; this converter asserts every one of the 45 keys and shapes (spec section 8). The file is
read with ``torch.load(weights_only=True)``: arbitrary pickled objects are never executed.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping

import torch
from safetensors.torch import save

from .adapters import AdapterError, adapter_metadata
from .errors import DreamCacheError

# LDM block of the official model -> diffusers block (spec 7). The widths are read from the checkpoint, so a
# checkpoint of the same layout at another width (a smaller or a wider UNet) converts too.
OFFICIAL_BLOCKS = {
    "middle_block.1": "mid_block.attentions.0",
    "output_blocks.4.1": "up_blocks.1.attentions.1",
    "output_blocks.6.1": "up_blocks.2.attentions.0",
    "output_blocks.8.1": "up_blocks.2.attentions.2",
    "output_blocks.10.1": "up_blocks.3.attentions.1",
}
SD_WIDTHS = (1280, 1280, 640, 640, 320)  # SD 1.5 and SD 2.1-base, in OFFICIAL_BLOCKS order
# attn_mem copies the block's own head split, which no weight shape records (to_q is C x C for any split): it
# is the backbone's rule of the width. SD 2.1: heads of 64 channels; SD 1.5: 8 heads.
HEAD_DIM = {"sd21": 64}
FIXED_HEADS = {"sd15": 8}
BACKBONES = sorted({*HEAD_DIM, *FIXED_HEADS})


def heads_for(backbone: str, channels: int) -> int:
    """The head count of a block of ``channels`` under ``backbone``'s rule; AdapterError if it does not divide."""
    if backbone in HEAD_DIM:
        heads, rest = divmod(channels, HEAD_DIM[backbone])
    elif backbone in FIXED_HEADS:
        heads, rest = FIXED_HEADS[backbone], channels % FIXED_HEADS[backbone]
    else:
        raise DreamCacheError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if rest or not heads:
        raise AdapterError(f"a block of {channels} channels cannot have {backbone}'s head split")
    return heads


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


def official_key_shapes(widths: tuple[int, ...] = SD_WIDTHS) -> dict[str, tuple[int, ...]]:
    """The 45 keys of an official checkpoint, as saved (``diffusion_model.`` prefix), with their shapes for the
    given block widths (SD's by default)."""
    return {
        f"diffusion_model.{ldm}.transformer_blocks.0.{suffix}": shape
        for ldm, c in zip(OFFICIAL_BLOCKS, widths, strict=True)
        for suffix, shape in _suffix_shapes(c).items()
    }


def block_widths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Each block's width C, from its ``attn_mem.to_q.weight`` [C, C] (keys already normalised)."""
    widths = []
    for ldm in OFFICIAL_BLOCKS:
        query = state.get(f"diffusion_model.{ldm}.transformer_blocks.0.attn_mem.to_q.weight")
        if not isinstance(query, torch.Tensor) or query.ndim != 2:
            raise AdapterError(f"not an official DreamCache adapter checkpoint: no attn_mem.to_q.weight matrix "
                               f"for {ldm} (keys missing)")
        widths.append(int(query.shape[0]))
    return tuple(widths)


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
    expected = official_key_shapes(block_widths(state))
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
        converted[key.removeprefix("diffusion_model.").replace(block, OFFICIAL_BLOCKS[block], 1)] = value
    return converted


def unsafe_checkpoint_reason(torch_message: str) -> str:
    """What is wrong with a checkpoint torch.load(weights_only=True) refused, without torch's advice to re-run
    with weights_only=False (that would execute the file's code): just the offending global or opcode."""
    found = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", torch_message)
    if found:
        name = found.group(1) or found.group(2)
        return f"not a plain tensor checkpoint: it references {name} (code, not tensors); refusing to unpickle it"
    # torch's text is advice (re-run with weights_only=False, file an issue) around one line of diagnosis.
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "Please file an issue")
    detail = "; ".join(line.strip() for line in torch_message.splitlines()
                       if line.strip() and not any(a in line for a in advice)) or "not a pickle torch reads"
    return f"not a plain tensor checkpoint ({detail}); refusing to unpickle it"


def convert_official_checkpoint(data: bytes, backbone: str = "sd21", dtype: torch.dtype = torch.float16) -> bytes:
    """Bytes of a ``cross_attention-*.pt`` -> bytes of a DreamCache adapter safetensors file.

    The released checkpoint is for SD 2.1-base; ``backbone`` names the head split (SD 1.5: 8 heads instead of
    C/64), which the shapes cannot tell. Block widths come from the checkpoint; a checkpoint whose widths are not
    SD's is labelled backbone "custom" (any UNet of those widths may load it).
    """
    if backbone not in BACKBONES:
        raise DreamCacheError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol advisory would be a second stderr line
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or malicious pickles
        raise AdapterError(unsafe_checkpoint_reason(str(exc)), kind="unsupported") from None
    if not isinstance(state, Mapping):
        raise AdapterError(f"checkpoint holds a {type(state).__name__}, expected a dict of tensors")
    converted = {k: v.to(dtype).contiguous() for k, v in convert_official_state(state).items()}
    channels = [converted[f"{name}.transformer_blocks.0.norm2_mem.weight"].shape[0] for name in OFFICIAL_BLOCKS.values()]
    heads = [heads_for(backbone, c) for c in channels]
    label = backbone if tuple(channels) == SD_WIDTHS else "custom"
    metadata = adapter_metadata(label, list(OFFICIAL_BLOCKS.values()), channels, heads,
                                converted_from="official cross_attention checkpoint", head_rule=backbone)
    return save(converted, metadata=metadata)
