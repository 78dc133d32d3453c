"""Rendering a batch of plan rows: the Ray Data actor that loads the pipeline once, reads each distinct cache
once per batch (keeping recent ones across batches), renders and writes the PNGs. Runs inside the actors; no
Ray here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from dreamcache import storage
from dreamcache.cache_info import CacheError
from dreamcache.image_files import png_bytes
from dreamcache.runtime import ModelSpec, load_pipeline, quiet_libraries

from .manifest import result_row, result_schema
from .settings import RenderSettings

logger = logging.getLogger(__name__)


class CacheReader:
    """Reads and validates caches for a pipeline, keeping the ``size`` most recent: a batch reads each distinct
    cache once, and rows sorted by subject let the next batch reuse it. Failures are not kept."""

    def __init__(self, load: Callable[[str], Any], size: int) -> None:
        self._load = load
        self._size = size
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self.reads = 0

    def get(self, uri: str) -> tuple[Any, float]:
        """(cache, seconds spent reading it: 0 when it was already here)."""
        if uri in self._recent:
            self._recent.move_to_end(uri)
            return self._recent[uri], 0.0
        start = time.perf_counter()
        cache = self._load(uri)
        self.reads += 1
        self._recent[uri] = cache
        while len(self._recent) > self._size:
            self._recent.popitem(last=False)
        return cache, time.perf_counter() - start


def encode_png(image, parameters: str, model_fingerprint: str = "") -> bytes:
    """PNG with the row's parameters (its JSON, as planned) in text chunks; see dreamcache.image_files."""
    row = json.loads(parameters)
    return png_bytes(image, row, model_fingerprint, row.get("cache_version") or "")


def render_rows(pipe, rows: Sequence[Mapping], settings: RenderSettings, caches: CacheReader) -> list[dict]:
    """Render a batch of plan records with ``pipe``; one result per record, errors included.

    Caches are read once per distinct URI; rows that share guidance settings go through one pipeline call
    (a call may mix subjects: one cache per prompt)."""
    import torch

    results: dict[int, dict] = {}
    loaded: dict[str, Any] = {}
    read_time: dict[str, float] = {}
    for uri in dict.fromkeys(r["cache_uri"] for r in rows):
        try:
            loaded[uri], read_time[uri] = caches.get(uri)
        except (CacheError, storage.StorageError, ValueError) as exc:
            for r in rows:
                if r["cache_uri"] == uri:
                    results[r["plan_index"]] = result_row(r, "error", "failed", f"cache unusable: {exc}")
    readers = {uri: sum(1 for r in rows if r["cache_uri"] == uri) for uri in read_time}

    groups: dict[tuple[float, float], list[Mapping]] = {}
    for r in rows:
        if r["plan_index"] not in results:
            groups.setdefault((r["guidance_scale"], r["image_guidance_scale"]), []).append(r)
    for (scale, image_scale), group in groups.items():
        started = time.time()
        try:
            images = pipe(
                [r["prompt"] for r in group], [loaded[r["cache_uri"]] for r in group],
                negative_prompt=[r["negative_prompt"] or "" for r in group], num_inference_steps=settings.steps,
                guidance_scale=scale, image_guidance_scale=image_scale, guidance=settings.guidance,
                generator=[torch.Generator().manual_seed(int(r["seed"])) for r in group],
                height=settings.height, width=settings.width,
            ).images
        except Exception as exc:  # noqa: BLE001 - one bad batch (say, out of memory) must not lose the others
            logger.exception("generation failed for %d rows", len(group))
            for r in group:
                results[r["plan_index"]] = result_row(r, "error", "failed", f"generation failed: {type(exc).__name__}: {exc}")
            continue
        generate_s = (time.time() - started) / len(group)
        for r, image in zip(group, images):
            write_start = time.perf_counter()
            try:
                data = encode_png(image, r["parameters"], getattr(pipe, "base_model", ""))
                storage.write_bytes(r["image_uri"], data)
            except storage.StorageError as exc:
                results[r["plan_index"]] = result_row(r, "error", "failed", f"writing {r['image_uri']}: {exc}")
                continue
            results[r["plan_index"]] = result_row(
                r, "ok", "rendered", bytes=len(data), generate_s=generate_s,
                cache_read_s=read_time[r["cache_uri"]] / readers[r["cache_uri"]],
                write_s=time.perf_counter() - write_start, started_at=started, finished_at=time.time(),
            )
    return [results[r["plan_index"]] for r in rows]


def load_render_pipeline(settings: RenderSettings):
    """The pipeline on its device and dtype, quiet, from the model and adapter URIs (``dreamcache.runtime``'s one
    loader). Reads only ``model``, ``adapter``, ``device``, ``dtype`` and ``torch_threads`` (the Serve generator
    passes its ServeSettings)."""
    quiet_libraries()
    pipe = load_pipeline(ModelSpec(model=settings.model, adapter=settings.adapter, device=settings.device,
                                   dtype=settings.dtype, torch_threads=settings.torch_threads))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class GenerationWorker:
    """The Ray Data actor: loads the pipeline once, renders one batch (an Arrow table of plan records) per call."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        self.pipe = load_render_pipeline(settings)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        # Kept on the device: a subject spanning several batches is copied there once.
        self.caches = CacheReader(lambda uri: self.pipe.load_cache(uri).to(device, dtype), settings.cache_lru_size)

    def __call__(self, batch):
        results = render_rows(self.pipe, batch.to_pylist(), self.settings, self.caches)
        return pa.Table.from_pylist(results, schema=result_schema())
