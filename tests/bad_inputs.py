"""The bad-input corpus of issue 11: one list of cases, each a kind of input, how to make it, and what every entry
point that takes that kind must answer. ``test_bad_inputs.py`` runs each case through those entry points.

Kinds and the entry points that take them:

* ``cache``: a subject's cache file: ``dreamcache generate --cache`` (CLI), ``GET /v1/subjects/{id}`` and
  ``POST /v1/generate`` (Serve, the file placed in the open app's cache folder under the case's subject id).
* ``adapter``: an adapter file: ``dreamcache generate --adapter``.
* ``model``: a model folder: ``dreamcache generate --model``.
* ``checkpoint``: an official ``.pt``: ``dreamcache convert-official``.
* ``generate_body``: a raw JSON body of ``POST /v1/generate`` (Serve only).

A case's input is made by ``make(ctx)`` (``ctx``: a :class:`Materials` with the tiny model and a good cache)
and is a path for the file kinds, a JSON text for ``generate_body``.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

Kind = str  # "cache" | "adapter" | "model" | "checkpoint" | "generate_body"


class Materials(NamedTuple):
    """What the cases are made from: a scratch folder, the tiny model, a valid cache of it (bytes)."""

    tmp: Path
    model_dir: Path
    good_cache: bytes


@dataclass(frozen=True)
class Http:
    """An expected HTTP answer: the status and a text the body must contain (the field or file it names)."""

    status: int
    names: str


@dataclass(frozen=True)
class Case:
    name: str
    kind: Kind
    make: Callable[[Materials], str]
    cli: str | None = None  # the one error line must contain this (exit 2); None: no CLI entry point
    subject: Http | None = None  # GET /v1/subjects/{id}
    generate: Http | None = None  # POST /v1/generate


# -- makers -------------------------------------------------------------------------------------------------------
def _write(ctx: Materials, name: str, data: bytes) -> str:
    path = ctx.tmp / name
    path.write_bytes(data)
    return str(path)


def _nan_cache(ctx: Materials) -> str:
    import torch
    from safetensors.torch import load, save

    from dreamcache.safetensors_header import read_metadata

    tensors = {k: torch.full_like(v, float("nan")) for k, v in load(ctx.good_cache).items()}
    return _write(ctx, "nan-cache.safetensors", save(tensors, metadata=read_metadata(ctx.good_cache)))


def _nan_adapter(ctx: Materials) -> str:
    import torch
    from safetensors.torch import load, save

    from dreamcache.safetensors_header import read_metadata

    data = (ctx.model_dir / "adapter.safetensors").read_bytes()
    tensors = {k: torch.full_like(v, float("inf")) for k, v in load(data).items()}
    return _write(ctx, "inf-adapter.safetensors", save(tensors, metadata=read_metadata(data)))


def _pickle_model(ctx: Materials) -> str:
    """The tiny model with its UNet weights as a pickle ``.bin`` instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    out = ctx.tmp / "pickle-model"
    if not out.exists():
        shutil.copytree(ctx.model_dir, out)
        weights = next((out / "unet").glob("*.safetensors"))
        torch.save(load_file(weights), out / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()
    return str(out)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))  # never run: weights_only refuses it


def _malicious_checkpoint(ctx: Materials) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save({"attn_mem.to_q.weight": _RunsCode()}, buffer)
    return _write(ctx, "malicious.pt", buffer.getvalue())


def _raw_pickle_checkpoint(ctx: Materials) -> str:
    return _write(ctx, "raw-pickle.pt", pickle.dumps({"a": _RunsCode()}))


def _body(field: str, value: str) -> Callable[[Materials], str]:
    return lambda ctx: f'{{"subject_id": "nobody", "prompt": "a photo", "{field}": {value}}}'


CASES: list[Case] = [
    Case("cache-nan", "cache", _nan_cache, cli="hold NaN or inf", generate=Http(409, "NaN")),
    Case("cache-truncated", "cache", lambda ctx: _write(ctx, "cut.safetensors", ctx.good_cache[:-64]),
         cli="not a readable cache file", subject=Http(409, "cache-truncated.safetensors"),
         generate=Http(409, "cache-truncated.safetensors")),
    Case("cache-empty", "cache", lambda ctx: _write(ctx, "empty.safetensors", b""),
         cli="not a readable cache file", subject=Http(409, "cache-empty.safetensors"),
         generate=Http(409, "cache-empty.safetensors")),
    Case("adapter-inf", "adapter", _nan_adapter, cli="hold NaN or inf"),
    Case("model-pickle-weights", "model", _pickle_model, cli="only .safetensors weights"),
    Case("checkpoint-code", "checkpoint", _malicious_checkpoint, cli="not a plain tensor checkpoint"),
    Case("checkpoint-raw-pickle", "checkpoint", _raw_pickle_checkpoint, cli="not a plain tensor checkpoint"),
    Case("guidance-nan", "generate_body", _body("guidance_scale", "NaN"), generate=Http(422, "guidance_scale")),
    Case("guidance-inf", "generate_body", _body("guidance_scale", "Infinity"), generate=Http(422, "guidance_scale")),
    Case("image-guidance-minus-inf", "generate_body", _body("image_guidance_scale", "-Infinity"),
         generate=Http(422, "image_guidance_scale")),
]


def cases(*kinds: Kind, entry: str | None = None) -> list[Case]:
    """The cases of these kinds that have an expectation for ``entry`` (cli, subject, generate)."""
    return [c for c in CASES if c.kind in kinds and (entry is None or getattr(c, entry) is not None)]
