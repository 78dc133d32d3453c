"""Generated images as files: their names and the parameters they carry.

Every PNG the project writes (``dreamcache generate``, the batch generation job, Serve's responses) goes through
:func:`png_bytes`, so any image can tell how to make it again; the CLI and the batch job name files with
:func:`image_name`, so a run with other parameters never overwrites an earlier image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from typing import Any

# The parameters written as separate PNG text chunks (readable by any PNG viewer); the whole mapping also goes
# into one JSON chunk, PARAMETERS_CHUNK, which is what a program should read.
PNG_TEXT_KEYS = ("prompt", "negative_prompt", "seed", "guidance_scale", "image_guidance_scale", "steps", "guidance",
                 "height", "width", "model", "model_fingerprint", "cache_fingerprint")
PARAMETERS_CHUNK = "dreamcache"


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "prompt"


def parameters_key(parameters: Mapping[str, Any]) -> str:
    """A stable hash of everything that decides an image's pixels."""
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def image_name(parameters: Mapping[str, Any]) -> tuple[str, str]:
    """(row key, file name): readable prefix (prompt, seed), then the hash of all the parameters."""
    key = parameters_key(parameters)
    return key, f"{_slug(parameters['prompt'])}-s{parameters['seed']}-{key[:16]}.png"


def png_bytes(image, parameters: Mapping[str, Any], model_fingerprint: str = "", cache_fingerprint: str = "",
              compress_level: int = 6) -> bytes:
    """``image`` (PIL) as PNG carrying ``parameters`` as JSON (chunk :data:`PARAMETERS_CHUNK`), and one text chunk
    per :data:`PNG_TEXT_KEYS` entry present, the fingerprints of the model and cache included (they are not always
    among the parameters: a batch row names its model by URI). The same image and parameters give the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    fields = {**parameters, "model_fingerprint": model_fingerprint or None, "cache_fingerprint": cache_fingerprint or None}
    info = PngInfo()
    for key in PNG_TEXT_KEYS:
        if fields.get(key) is not None:
            info.add_text(key, str(fields[key]))
    info.add_text(PARAMETERS_CHUNK, json.dumps(dict(parameters), sort_keys=True, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
