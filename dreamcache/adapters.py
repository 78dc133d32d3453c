"""Conditioning adapters: reference cross-attention fused into the self-attention residual (spec section 2).

For each cached layer the block ``<layer>.transformer_blocks.0`` gets three new submodules with the official
names, so the official checkpoint converts by a prefix rename only:

    norm2_mem  LayerNorm(C)
    attn_mem   multi-head attention, queries from the block input, keys/values from the raw cached tokens
    linear_cat Linear(2C, C) over [self-attention output, reference-attention output]

and the block computes ``x + linear_cat([attn1(norm1(x)), attn_mem(norm2_mem(x), r)])`` in place of
``x + attn1(norm1(x))``. The stock diffusers block is left untouched: a forward pre-hook on the block records
its raw input ``x`` and a forward hook on ``attn1`` replaces its output ``a`` by ``linear_cat([a, a_c])``
for the batch rows that have a reference. Outside a ``reference(...)`` context the hooks return nothing, so
the UNet is bit-identical to the frozen model (the paper's plug-and-play property). Hooks, unlike attention
processors, survive a later ``unet.set_attn_processor(...)``.

The adapters' keys and values depend only on the cache, so ``reference(...)`` computes them once per call and
every denoising step reuses them.

Adapter scale (an extension; the official code has no such knob, spec 4.2): each block holds a scalar buffer
``s`` and the attending rows compute ``x + lerp(a, linear_cat([a, a_c]), s)``. ``s = 1`` (the default) is the
method exactly (lerp returns its end point bit-exactly at weight 1) and ``s = 0`` is the bypass, i.e. the frozen
SD block bit-exactly. Scaling ``a_c`` instead would not recover SD at 0, since ``linear_cat`` replaces the
self-attention term. The scale is a buffer read in the forward, not a Python float, so a ``torch.compile``d UNet
sees a new value without recompiling.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors import SafetensorError
from torch import nn

from .errors import DreamCacheError
from .layers import CachedLayer, select_layers
from .safetensors_header import read_metadata
from .training_config import LinearCatInit

ADAPTER_MODULES = ("norm2_mem", "attn_mem", "linear_cat")
SCALE_BUFFER = "dreamcache_scale"  # non-persistent: not in any state dict, so adapter files are unchanged
ADAPTER_FORMAT = "dreamcache-adapter"
ADAPTER_FORMAT_VERSION = "1"


class AdapterError(DreamCacheError, ValueError):
    """An adapter file or state dict that does not fit the UNet it is loaded into (a ValueError too, for
    callers written before the DreamCacheError family)."""

    kind = "incompatible"


def backbone_family(unet_config: Mapping) -> str:
    """Name the backbone for adapter metadata: the adapters of SD 1.5 and SD 2.1 differ only in the head split."""
    channels = list(unet_config["block_out_channels"])
    if channels == [320, 640, 1280, 1280]:
        if unet_config["cross_attention_dim"] == 768:
            return "sd15"
        if unet_config["cross_attention_dim"] == 1024:
            return "sd21"
    return "custom"


@dataclass
class _Reference:
    """Per-call state of one layer: precomputed keys/values of the caches, per attending batch row."""

    rows: torch.Tensor | None  # indices of batch rows that attend to a cache; None means every row
    key: torch.Tensor  # [R, heads, M, head_dim]
    value: torch.Tensor
    mask: torch.Tensor | None  # [R, 1, 1, M] True = real token; only when caches of different lengths are padded


class LayerAdapter:
    """The adapter of one cached layer: owns its three modules (registered on the block) and its two hooks."""

    def __init__(self, layer: CachedLayer, block: nn.Module, init: LinearCatInit = "default") -> None:
        self.layer = layer
        self.block = block
        channels = block.norm1.normalized_shape[0]
        if channels != layer.channels:
            raise AdapterError(f"{layer.name}: block has {channels} channels, layer rule says {layer.channels}")
        heads = block.attn1.heads
        param = next(block.parameters())
        factory = {"device": param.device, "dtype": param.dtype}
        # Head layout equals the block's own self-attention (SD 2.1: C/64 heads of 64; SD 1.5: 8 heads of C/8).
        block.norm2_mem = nn.LayerNorm(channels, eps=1e-5, **factory)
        block.attn_mem = Attention(
            query_dim=channels, cross_attention_dim=channels, heads=heads, dim_head=channels // heads,
            bias=False, out_bias=True,
        ).to(**factory)
        block.linear_cat = nn.Linear(2 * channels, channels, bias=True, **factory)
        if init == "identity":
            # Deviation A7 (option): start exactly at SD by passing the self-attention output through.
            with torch.no_grad():
                block.linear_cat.weight.zero_()
                block.linear_cat.weight[:, :channels].copy_(torch.eye(channels))
                block.linear_cat.bias.zero_()
        elif init != "default":
            raise ValueError(f"unknown linear_cat init {init!r}")
        block.register_buffer(SCALE_BUFFER, torch.ones((), **factory), persistent=False)
        self.reference: _Reference | None = None
        self._block_input: torch.Tensor | None = None
        self._handles = [
            block.register_forward_pre_hook(self._record_input, with_kwargs=True),
            block.attn1.register_forward_hook(self._fuse),
        ]

    # -- hooks ---------------------------------------------------------------------------------------------
    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.reference is not None:
            self._block_input = args[0] if args else kwargs["hidden_states"]

    def _fuse(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        ref = self.reference
        if ref is None:
            return None  # plug-and-play: exactly the frozen block
        x, a = self._block_input, output
        self._block_input = None
        if ref.rows is not None:
            x, a_sel = x.index_select(0, ref.rows), a.index_select(0, ref.rows)
        else:
            a_sel = a
        fused = self.block.linear_cat(torch.cat([a_sel, self.attend(x, ref)], dim=-1))
        fused = torch.lerp(a_sel, fused, getattr(self.block, SCALE_BUFFER).to(fused.dtype))
        if ref.rows is None:
            return fused
        return a.index_copy(0, ref.rows, fused.to(a.dtype))

    def attend(self, x: torch.Tensor, ref: _Reference) -> torch.Tensor:
        """attn_mem(norm2_mem(x), r) with the keys/values of r already projected."""
        attn = self.block.attn_mem
        batch, tokens, channels = x.shape
        query = attn.to_q(self.block.norm2_mem(x)).view(batch, tokens, attn.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, ref.key, ref.value, attn_mask=ref.mask)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return attn.to_out[1](attn.to_out[0](out))

    # -- per-call state ------------------------------------------------------------------------------------
    def project(self, caches: Sequence[torch.Tensor], subject_of_row: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Project each subject's cached tokens to keys/values once, then gather them per attending row."""
        attn = self.block.attn_mem
        param = attn.to_k.weight
        keys, values = [], []
        for feature in caches:  # [n_refs, C, H, W]: several references are concatenated along the tokens
            tokens = feature.to(device=param.device, dtype=param.dtype).permute(0, 2, 3, 1).reshape(1, -1, feature.shape[1])
            keys.append(attn.to_k(tokens).view(1, tokens.shape[1], attn.heads, -1).transpose(1, 2))
            values.append(attn.to_v(tokens).view(1, tokens.shape[1], attn.heads, -1).transpose(1, 2))
        lengths = [k.shape[2] for k in keys]
        mask = None
        if len(set(lengths)) > 1:  # multi-reference subjects with different reference counts share a batch
            longest = max(lengths)
            keys = [F.pad(k, (0, 0, 0, longest - k.shape[2])) for k in keys]
            values = [F.pad(v, (0, 0, 0, longest - v.shape[2])) for v in values]
            valid = torch.arange(longest, device=param.device)[None, :] < torch.tensor(lengths, device=param.device)[:, None]
            mask = valid[subject_of_row][:, None, None, :]
        index = subject_of_row.to(param.device)
        self.reference = _Reference(
            rows=None if rows is None else rows.to(param.device),
            key=torch.cat(keys).index_select(0, index),
            value=torch.cat(values).index_select(0, index),
            mask=mask,
        )

    def clear(self) -> None:
        self.reference = None
        self._block_input = None

    def remove(self) -> None:
        self.clear()
        for handle in self._handles:
            handle.remove()
        for name in (*ADAPTER_MODULES, SCALE_BUFFER):
            delattr(self.block, name)

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self.block, SCALE_BUFFER)


class DreamCacheAdapters:
    """The conditioning adapters of one UNet: install, switch a reference on for a call, save, load."""

    def __init__(
        self, unet: UNet2DConditionModel, layers: Sequence[CachedLayer] | None = None, init: LinearCatInit = "default"
    ) -> None:
        if getattr(unet, "dreamcache_adapters", None) is not None:
            raise AdapterError("this UNet already has DreamCache adapters; call .remove() first")
        self.unet = unet
        self.layers = list(layers) if layers is not None else select_layers(unet.config)
        self.adapters = {
            layer.name: LayerAdapter(layer, unet.get_submodule(layer.name).transformer_blocks[0], init)
            for layer in self.layers
        }
        # A plain attribute (not a registered module): lets a pipeline find the adapters of a UNet it is handed.
        unet.dreamcache_adapters = self

    # -- parameters ----------------------------------------------------------------------------------------
    def modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, adapter in self.adapters.items():
            for module in ADAPTER_MODULES:
                yield f"{name}.transformer_blocks.0.{module}", getattr(adapter.block, module)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, module in self.modules():
            yield from module.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{key}": value for prefix, module in self.modules() for key, value in module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load diffusers-named adapter weights; every key and shape must match (no silent partial loads)."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise AdapterError(
                f"adapter weights do not fit this UNet: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for key, value in expected.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise AdapterError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        for prefix, module in self.modules():
            sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub, strict=True)

    def set_scale(self, scale: float | Mapping[str, float]) -> None:
        """One float for every layer, or a dict layer name -> float; as diffusers' ``set_ip_adapter_scale``, a
        layer the dict does not name gets 0 (bypassed). Written in place into the blocks' scale buffers."""
        if isinstance(scale, Mapping):
            unknown = sorted(set(scale) - set(self.adapters))
            if unknown:
                raise ValueError(f"unknown adapter layers {unknown}; the cached layers are {list(self.adapters)}")
            values = {name: float(scale.get(name, 0.0)) for name in self.adapters}
        else:
            values = dict.fromkeys(self.adapters, float(scale))
        for name, adapter in self.adapters.items():
            adapter.scale.fill_(values[name])  # in place: a compiled graph reads the same buffer

    def scales(self) -> dict[str, float]:
        return {name: float(adapter.scale) for name, adapter in self.adapters.items()}

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Inside the block the UNet's modules and state dict are the stock ones (for saving it in diffusers
        layout); the adapters come back afterwards. Hooks stay: outside ``reference(...)`` they do nothing."""
        stashed = {}
        for name, adapter in self.adapters.items():
            stashed[name] = {m: adapter.block._modules.pop(m) for m in ADAPTER_MODULES}
            stashed[name][SCALE_BUFFER] = adapter.block._buffers.pop(SCALE_BUFFER)
        try:
            yield
        finally:
            for name, adapter in self.adapters.items():
                for m in ADAPTER_MODULES:
                    adapter.block._modules[m] = stashed[name][m]
                adapter.block._buffers[SCALE_BUFFER] = stashed[name][SCALE_BUFFER]
                adapter.block._non_persistent_buffers_set.add(SCALE_BUFFER)

    def metadata(self) -> dict[str, str]:
        return adapter_metadata(
            backbone_family(self.unet.config),
            [layer.name for layer in self.layers],
            [layer.channels for layer in self.layers],
            [a.block.attn1.heads for a in self.adapters.values()],
        )

    # -- per call ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(
        self, caches: Sequence[Mapping[str, torch.Tensor]], subject_of_row: Sequence[int | None]
    ) -> Iterator[None]:
        """Make the UNet attend to reference caches inside the ``with`` block.

        ``caches`` holds one feature dict per subject (layer name -> [n_refs, C, H, W]); ``subject_of_row``
        gives, for every batch row the adapted layers will see, the index of its subject or None to bypass the
        adapters for that row (the no-reference branch of guidance). Keys and values are projected here, once.
        """
        attending = [i for i, s in enumerate(subject_of_row) if s is not None]
        if not attending:
            yield
            return
        for cache in caches:
            missing = [layer.name for layer in self.layers if layer.name not in cache]
            if missing:
                raise AdapterError(f"feature cache lacks layers {missing}")
        subject_index = torch.tensor([subject_of_row[i] for i in attending], dtype=torch.long)
        rows = None if len(attending) == len(subject_of_row) else torch.tensor(attending, dtype=torch.long)
        try:
            for name, adapter in self.adapters.items():
                adapter.project([cache[name] for cache in caches], subject_index, rows)
            yield
        finally:
            for adapter in self.adapters.values():
                adapter.clear()

    def remove(self) -> None:
        """Uninstall: the UNet is the stock model again."""
        for adapter in self.adapters.values():
            adapter.remove()
        self.unet.dreamcache_adapters = None


def adapter_metadata(backbone: str, layers: list[str], channels: list[int], heads: list[int], **extra: str) -> dict[str, str]:
    """The metadata of an adapter file: what it is, for which backbone, which layers."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "backbone": backbone,
        "layers": json.dumps(layers),
        "channels": json.dumps(channels),
        "heads": json.dumps(heads),
        **extra,
    }


def adapter_file_bytes(adapters: DreamCacheAdapters, dtype: torch.dtype = torch.float16) -> bytes:
    """Serialise the adapters as safetensors with diffusers-named keys and metadata naming backbone and layers."""

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapters.state_dict().items()}
    return safetensors.torch.save(state, metadata=adapters.metadata())


def parse_adapter_file(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file; a truncated or foreign file gets a clear AdapterError naming ``source``."""

    try:
        state = safetensors.torch.load(data)
        metadata = read_metadata(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{source} is not a readable safetensors adapter file ({exc})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{source} is not a DreamCache adapter file (metadata format={metadata.get('format')!r})")
    bad = non_finite_tensors(state)
    if bad:  # NaN/inf weights render all-black images without any error: refuse them here
        raise AdapterError(f"{source}: adapter tensor(s) {bad[:3]} hold NaN or inf values (a corrupt or diverged "
                           "checkpoint)", kind="invalid")
    return state, metadata


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors with a NaN or inf value, sorted."""
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
