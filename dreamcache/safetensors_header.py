"""Read a safetensors file's header (tensor table and string metadata) without loading its tensors.

Adapter files, cache files and the caching job's resume check all need the metadata; one parser serves them.
"""

from __future__ import annotations

import json

MAX_HEADER = 100 * 2**20  # safetensors' own limit


def header_length(data: bytes) -> int:
    """The JSON header's length, from the first 8 bytes (little-endian u64)."""
    if len(data) < 8:
        raise ValueError("too short to be a safetensors file")
    length = int.from_bytes(data[:8], "little")
    if not 0 < length <= MAX_HEADER:
        raise ValueError(f"implausible safetensors header length {length}")
    return length


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a file whose first bytes (at least the header) are ``data``."""
    length = header_length(data)
    if len(data) < 8 + length:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata or {}, dict):
        raise ValueError("malformed safetensors header: not a JSON object")
    return metadata or {}


def file_size(data: bytes) -> int:
    """The size the whole file must have, from its header: a stored cache cut short (or padded) does not match."""
    length = header_length(data)
    if len(data) < 8 + length:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + length])
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + length + max(ends, default=0)
