"""Where subjects' feature caches live: ``<root>/<subject_id>.safetensors`` under a folder or an s3:// prefix.

The caching job, the CLI, the Serve app and the batch generation job all address caches through this one
layout; the subject id is validated before it becomes a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import storage
from .cache_info import CacheError, CacheInfo
from .layers import CachedLayer
from .safetensors_header import file_size, header_length, read_metadata

if TYPE_CHECKING:  # .cache loads torch and diffusers: listing or naming caches (a job's planner) needs neither
    from .cache import FeatureCache

CACHE_SUFFIX = ".safetensors"


def read_cache_info(uri: str, size: int | None = None) -> CacheInfo:
    """What a stored cache was made from, from its header alone (about 1 KiB, one ranged GET; a second only for an
    unusual header), not its 6 MB of tensors. ObjectNotFound if absent, CacheError if not a cache we read, or if
    ``size`` (the stored object's, from a listing) is not the size its header promises (a cut-short file)."""

    if size is not None and size < 8:  # an empty object: no header to read (and S3 refuses a range of it)
        raise CacheError(f"{uri}: not a readable cache file ({size} bytes)")
    try:
        head = storage.read_range(uri, 0, 1 << 16)
        if len(head) < 8 + header_length(head):
            head = storage.read_range(uri, 0, 8 + header_length(head))
        meta = read_metadata(head)
        if size is not None and file_size(head) != size:
            raise ValueError(f"{size} bytes stored, the header describes {file_size(head)}")
    except ValueError as exc:
        raise CacheError(f"{uri}: not a readable cache file ({exc})") from None
    return CacheInfo.from_file_metadata(meta, uri)


@dataclass(frozen=True)
class CacheStore:
    root: str  # a folder, file:// URI or s3:// prefix

    def uri_for(self, subject_id: str) -> str:
        return storage.join_uri(self.root, storage.validate_id(subject_id) + CACHE_SUFFIX)

    def exists(self, subject_id: str) -> bool:
        return storage.exists(self.uri_for(subject_id))

    def write(self, subject_id: str, cache: FeatureCache) -> tuple[str, int]:
        """Write whole (atomic put / rename); returns the URI and the size in bytes."""
        data = cache.to_bytes()
        uri = self.uri_for(subject_id)
        storage.write_bytes(uri, data)
        return uri, len(data)

    def read(self, subject_id: str, layers: list[CachedLayer] | None = None, base_model: str | None = None) -> FeatureCache:
        """Read and validate; raises storage.ObjectNotFound for an unknown subject, CacheError for a bad file."""
        from .cache import FeatureCache

        uri = self.uri_for(subject_id)
        return FeatureCache.from_bytes(storage.read_bytes(uri), uri, layers, base_model)

    def page(self, limit: int, after: str | None = None) -> tuple[list[tuple[str, storage.ListedObject]], str | None]:
        """Up to ``limit`` (subject id, stored object) in id-key order after the subject ``after``, and the
        cursor of the next page (None at the end)."""
        if after is not None:
            storage.validate_id(after, "cursor")
        listed, more = storage.list_page(self.root, None if after is None else after + CACHE_SUFFIX, limit,
                                         CACHE_SUFFIX)
        found = [(obj.name[: -len(CACHE_SUFFIX)], obj) for obj in listed]
        return found, (found[-1][0] if more and found else None)

    def subjects(self) -> list[str]:
        """Subject ids with a cache file directly under the root (sorted)."""
        base = self.root.rstrip("/") + "/"
        relative = (uri[len(base):] for uri in storage.list_files(self.root) if uri.startswith(base))
        return sorted(r[: -len(CACHE_SUFFIX)] for r in relative if r.endswith(CACHE_SUFFIX) and "/" not in r)
