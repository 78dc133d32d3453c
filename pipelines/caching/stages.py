"""The caching job's stages after the plan: read (CPU tasks), compute (an actor pool), write (CPU tasks).

    read (CPU)      per subject: GET, hash, decode, validate and resize every image (one shared decoder,
                    dreamcache.images); a cache already in the store is checked against its header here
    compute (pool)  an actor pool (model loaded once per actor, GPUs settable) batches the references of many
                    subjects through the UNet; a cache already in the store with the same sources, base model
                    and settings (a resumed run) is not recomputed
    write (CPU)     each cache written whole to <out>/<subject_id>.safetensors
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pyarrow as pa

from dreamcache import storage
from dreamcache.cache_info import CACHE_TIMESTEP, CacheError
from dreamcache.cache_store import read_cache_info
from dreamcache.images import ImageDecodeError, ImageLimits, decode_image, prepare_reference, sha256_hex
from dreamcache.runtime import ModelSpec, load_pipeline

from .config import CachingJobConfig
from .plan import WORK_SCHEMA, fail

logger = logging.getLogger(__name__)


def retryable(exc: Exception) -> bool:
    """Bad or missing input stays bad until it changes; other storage failures may pass."""
    return not isinstance(exc, (ImageDecodeError, storage.ObjectNotFound))


def read_stage(batch: pa.Table, config: CachingJobConfig, resolution: int) -> pa.Table:
    """CPU stage: fetch, hash, decode, validate and resize every reference of each subject."""
    limits = config.limits()
    rows = [_read_subject(row, config, (resolution, resolution), limits) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def _read_subject(row: dict, config: CachingJobConfig, size: tuple[int, int], limits: ImageLimits) -> dict:
    start = time.perf_counter()
    try:
        hashes, pixels = [], []
        for uri in row["source_uris"]:
            data = storage.read_bytes(uri)
            hashes.append(sha256_hex(data))
            image = prepare_reference(decode_image(data, source=uri, limits=limits), size, config.preprocess)
            pixels.append(image.tobytes())
        row.update(source_hashes=hashes, pixels=pixels)
    except (ImageDecodeError, storage.StorageError) as exc:
        fail(row, str(exc), retryable=retryable(exc))
    else:
        row["stored_cache"] = _stored_cache(row, config, size)
    row["read_s"] = time.perf_counter() - start
    return row


def _stored_cache(row: dict, config: CachingJobConfig, size: tuple[int, int]) -> str | None:
    """A resumed run (killed before its manifest): the store may already hold this subject's cache from these
    very sources and settings. Its header is read here, in the parallel CPU stage, so that the actor only
    compares the base-model fingerprint (known once the model is loaded) and its GPU never waits on storage."""
    if row["stored_cache"] is None:  # the plan's listing found no cache file
        return None
    try:
        info = read_cache_info(row["cache_uri"], size=json.loads(row["stored_cache"])["bytes"])
    except (storage.StorageError, CacheError):
        return None  # gone meanwhile, or not one we can trust: compute it
    same = (info.timestep == CACHE_TIMESTEP
            and list(info.source_hashes) == row["source_hashes"] and info.cache_prompt == config.cache_prompt
            and info.preprocess == config.preprocess and info.seed == config.seed and info.resolution == size)
    if not same:
        return None
    return json.dumps({"base_model": info.base_model, "bytes": json.loads(row["stored_cache"])["bytes"]})


class CacheActor:
    """GPU (or CPU) actor: loads the pipeline once, turns batches of subjects into cache files' bytes.

    Ray Data may run ``actor_concurrency`` calls at once in this actor's threads. Only ``build_caches`` (image
    tensors, VAE encode, UNet, copy back to the host) holds ``_model_lock``, because the feature hooks live on
    the shared UNet; turning the rows into images before it and serializing the caches after it run outside,
    overlapped with another batch's model work. ``compute_s`` in the manifest is the time under the lock.
    """

    def __init__(self, config: CachingJobConfig) -> None:
        self.config = config
        device = "cuda" if config.gpus_per_actor > 0 else "cpu"  # "cuda" without one fails here, in one line
        # Caching needs the frozen UNet alone: no adapter file is loaded, even if the model folder has one.
        self.pipe = load_pipeline(ModelSpec(model=config.model, adapter=False, device=device, dtype=config.dtype))
        self.device = self.pipe.unet.device
        self.pipe.set_progress_bar_config(disable=True)  # the job prints its own progress
        self.resolution = config.resolution or self.pipe.default_resolution
        self._model_lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if row["status"] == "ok" and row["action"] is None and not self._already_cached(row)]
        if todo:
            try:
                blobs, model_s = self._compute(todo)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the job; rows say why
                logger.exception("cache computation failed for %d subjects", len(todo))
                for row in todo:
                    fail(row, f"computation failed: {exc}", retryable=True)
            else:
                share = model_s / len(todo)
                for row, blob in zip(todo, blobs):
                    row.update(cache_bytes=blob, action="computed", base_model=self.pipe.base_model, compute_s=share)
        for row in rows:
            row["pixels"] = []
        return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)

    def _already_cached(self, row: dict) -> bool:
        """The read stage found a cache of these sources and settings; it counts if the model is this one."""
        stored = json.loads(row["stored_cache"]) if row["stored_cache"] else None
        if stored is None or stored["base_model"] != self.pipe.base_model:
            return False
        row.update(action="skipped", base_model=stored["base_model"], bytes=stored["bytes"])
        return True

    def _compute(self, rows: list[dict]) -> tuple[list[bytes], float]:
        """All references of the batch through the UNet together, then regrouped into one cache file per subject;
        also the seconds spent holding the model (waiting for another call's turn excluded)."""
        from dreamcache.cache import FeatureCache

        res = self.resolution
        # Outside the lock: the prepared references as one contiguous uint8 [N, res, res, 3] array (no PIL round
        # trip); build_caches copies each layer back to the host once per batch (pinned, overlapped on CUDA).
        pixels = np.frombuffer(b"".join(p for row in rows for p in row["pixels"]), np.uint8).reshape(-1, res, res, 3)
        hashes = [h for row in rows for h in row["source_hashes"]]
        with self._model_lock:
            start = time.perf_counter()
            built = self.pipe.build_caches(
                pixels, hashes, resolution=res, preprocess=self.config.preprocess,
                cache_prompt=self.config.cache_prompt, seed=self.config.seed, batch_size=self.config.batch_size,
                to_host=True,
            )
            model_s = time.perf_counter() - start
        caches = iter(built)
        blobs = [FeatureCache.concat([next(caches) for _ in row["pixels"]], subject_id=row["subject_id"]).to_bytes()
                 for row in rows]
        return blobs, model_s


def actor_pool(config: CachingJobConfig):
    """The compute stage's pool, with ``actor_concurrency`` calls per actor where this Ray supports it."""
    import ray

    try:
        return ray.data.ActorPoolStrategy(size=config.actors, max_concurrent_calls_per_actor=config.actor_concurrency,
                                          enable_true_multi_threading=config.actor_concurrency > 1)
    except TypeError:  # an older Ray: one call at a time
        logger.warning("this Ray has no concurrent actor calls in Ray Data; actor_concurrency ignored")
        return ray.data.ActorPoolStrategy(size=config.actors)


def write_stage(batch: pa.Table) -> pa.Table:
    """CPU stage: write each computed cache whole; the bytes leave the dataset here."""
    rows = batch.to_pylist()
    for row in rows:
        blob, row["cache_bytes"] = row["cache_bytes"], None
        if blob is None:
            continue
        start = time.perf_counter()
        try:
            storage.write_bytes(row["cache_uri"], blob)
            row["bytes"] = len(blob)
        except storage.StorageError as exc:
            fail(row, f"writing the cache failed: {exc}", retryable=True)
        row["write_s"] = time.perf_counter() - start
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
