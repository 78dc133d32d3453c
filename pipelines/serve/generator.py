"""The generator deployment: a DreamCache pipeline on one GPU replica, with its subjects' caches on the device.

* Caches are held in a per-replica LRU keyed by subject id, and requests reach a replica that holds their
  subject; how is the app's ``routing`` setting (``routing.py``): ``multiplexed`` (the LRU is
  ``@serve.multiplexed``, the ingress sends ``multiplexed_model_id=subject_id``) or ``subject_affinity`` (the LRU
  is :class:`SubjectLRU`, the subject id is request data and the ingress's request router picks the replica).
* Requests are batched with ``@serve.batch`` ACROSS subjects: every sample attends to its own cache (the
  pipeline takes one cache per prompt), so one UNet call per step serves many subjects. Serve splits a batch by
  multiplexed model id; under ``multiplexed`` routing that would mean one subject per batch, so requests enter
  the batch queue from outside their request context, with no model id (``serve_batching.outside_request``);
  under ``subject_affinity`` there is no id to split by. Each item carries its subject's cache, looked up by
  explicit id in the LRU. Batches then pass through a :class:`DeviceQueue`, which merges the batches that wait
  while the device is busy into one call (``serve_batching``).
* New subjects are cached here too (the GPU replica runs the caching pass) and written to the cache store.
* One pipeline call at a time per replica (the scheduler is stateful, the GPU is one); the calls run in a
  worker thread so the replica keeps answering health checks and queueing requests meanwhile.
* The pipeline's step callback (``callback_on_step_end``) reports each step to the requests that stream their
  progress, and stops a call (the pipeline's ``interrupt``) once none of its requests is wanted any more: every
  one past its deadline, or cancelled (its client went away).
* Deleting a subject reaches every replica by a broadcast (``forget_subject``): the cache's device memory is
  freed at once; under ``subject_affinity`` its LRU slot is freed too, under ``multiplexed`` (Serve's LRU cannot
  drop one entry) the slot stays until evicted and is refilled only if the subject is registered again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve

from dreamcache import storage
from dreamcache.cache import CacheError, FeatureCache
from dreamcache.cache_store import CacheStore, read_cache_info
from dreamcache.image_files import png_bytes
from dreamcache.images import ImageDecodeError, ImageLimits, decode_image, sha256_hex

from .batching import DeviceQueue, outside_request
from .metrics import GeneratorMetrics
from .schema import (
    Failure,
    GenerateJob,
    GenerateResult,
    ModelInfo,
    Progress,
    SubjectOutcome,
    Upload,
    image_failure,
    subject_metadata,
)
from .settings import ServeSettings

logger = logging.getLogger(__name__)

# zlib level of the PNGs the replicas answer with: 4 of 9 is within a few per cent of the size of the default 6
# at a fraction of its time; bench/serve_load.py's offline baseline encodes with it too, so both do the same work.
PNG_COMPRESS_LEVEL = 4


@dataclass
class _Watch:
    """What the step callback needs of one request: whether anyone still wants it, and where its progress goes.
    Written by the event loop, read by the pipeline's worker thread (plain attribute reads and writes)."""

    deadline: float
    cancelled: bool = False  # the caller went away (a cancelled request, a closed event stream)
    on_step: Callable[[int, int], None] | None = None  # (steps done, steps), called from the worker thread

    def wanted(self, now: float) -> bool:
        return not self.cancelled and now <= self.deadline


@dataclass
class _BatchItem:
    job: GenerateJob
    cache: FeatureCache  # on the replica's device; items of one subject share the object
    cache_state: str
    watch: _Watch = field(default_factory=lambda: _Watch(float("inf")))


class _Stopped(Exception):
    """No request of a pipeline call is wanted any more (past its deadline or cancelled): it was interrupted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "deadline" or "cancelled"


class ResidentCache:
    """A subject's cache in the replica's LRU. The LRU calls ``__del__`` when it evicts the entry (Serve's
    multiplexer does; :class:`SubjectLRU` does the same, so one class serves both routings)."""

    def __init__(self, subject_id: str, cache: FeatureCache, on_evict: Callable[[str], None]) -> None:
        self.subject_id = subject_id
        # None once the subject was deleted (forget_subject): the LRU keeps the entry until it evicts it, and a
        # subject registered again refills it (Serve's multiplexer has no public way to drop one entry).
        self.cache: FeatureCache | None = cache
        self._on_evict: Callable[[str], None] | None = on_evict

    def __del__(self) -> None:
        # Called by Serve on eviction and again by the garbage collector: act once.
        on_evict, self._on_evict = self._on_evict, None
        if on_evict is not None:
            on_evict(self.subject_id)
        self.cache = None  # type: ignore[assignment]  # free the device memory now, not at the next GC

    def drop(self) -> None:
        """Out of the LRU for good (a deleted subject): the memory freed, no eviction reported, now or at GC."""
        self._on_evict = None
        self.cache = None  # type: ignore[assignment]


class SubjectLRU:
    """The replica's LRU of subject caches under ``subject_affinity`` routing: ``await lru(subject_id)`` is the
    held entry, loaded on a miss; at most ``capacity`` entries, the least recently used evicted (its ``__del__``
    called, as Serve's multiplexer does). Concurrent misses of one subject share one load."""

    def __init__(self, load: Callable[[str], Awaitable[ResidentCache]], capacity: int) -> None:
        self._load = load
        self._capacity = capacity
        self._entries: OrderedDict[str, ResidentCache] = OrderedDict()
        self._loading: dict[str, asyncio.Future[ResidentCache]] = {}

    async def __call__(self, subject_id: str) -> ResidentCache:
        entry = self._entries.get(subject_id)
        if entry is not None:
            self._entries.move_to_end(subject_id)
            return entry
        loading = self._loading.get(subject_id)
        if loading is None:
            loading = self._loading[subject_id] = asyncio.ensure_future(self._load_and_keep(subject_id))
        return await asyncio.shield(loading)  # a waiter that is cancelled must not cancel the others' load

    async def _load_and_keep(self, subject_id: str) -> ResidentCache:
        try:
            entry = await self._load(subject_id)
        finally:
            self._loading.pop(subject_id, None)
        self._entries[subject_id] = entry
        while len(self._entries) > self._capacity:
            _, evicted = self._entries.popitem(last=False)
            evicted.__del__()
        return entry

    def discard(self, subject_id: str) -> bool:
        """Drop a deleted subject's entry, so its slot is free at once (not an eviction: no ``__del__``
        callback); whether it was held."""
        entry = self._entries.pop(subject_id, None)
        if entry is not None:
            entry.drop()
        return entry is not None


def _images_in(items: list[_BatchItem]) -> int:
    """Batch size in images, not requests: the UNet batch is what the GPU pays for."""
    return sum(item.job.num_images for item in items)


def _cache_failure(exc: CacheError | storage.StorageError, subject_id: str, unknown_hint: str = "",
                   unusable: str = "is unusable") -> Failure:
    """The answer when a subject's stored cache cannot be had: not there (404), not usable (409), store down (503)."""
    if isinstance(exc, storage.ObjectNotFound):
        return Failure(404, f"unknown subject {subject_id!r}{unknown_hint}")
    if isinstance(exc, CacheError):
        return Failure(409, f"the stored cache of {subject_id!r} {unusable}: {exc}")
    return Failure(503, f"the cache store is unavailable: {exc}")


@serve.deployment(name="Generator", health_check_period_s=10, health_check_timeout_s=60)
class Generator:
    def __init__(self, settings: ServeSettings) -> None:
        from ..generation.render import load_render_pipeline

        self.settings = settings
        started = time.perf_counter()
        # The batch job's loader: ServeSettings carries the same model, adapter, device, dtype, torch_threads.
        self.pipe = load_render_pipeline(settings)
        self.device, self.dtype = self.pipe.unet.device, self.pipe.unet.dtype
        self.pipe.set_progress_bar_config(disable=True)  # progress goes to the step callback, not to stderr
        self.store = CacheStore(settings.caches)
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._pipe_lock = asyncio.Lock()
        self._create_lock = asyncio.Lock()  # one caching pass at a time; also makes a repeated upload a no-op
        self._fresh: dict[str, FeatureCache] = {}  # caches just computed here, handed to the LRU without a read
        # What the LRU holds with a live cache, readable without touching its order.
        self._resident: dict[str, ResidentCache] = {}
        self._counts_lock = threading.Lock()
        self._waiting: set[int] = set()  # ids of the watches of generate requests not yet in a pipeline call
        self._counts = {"loads": 0, "evictions": 0, "batches": 0, "images": 0, "max_batch_subjects": 0,
                        "max_batch_images": 0, "subjects_created": 0, "abandoned": 0, "cancelled": 0,
                        "forgotten": 0, "steps": 0,  # denoising steps run (one per UNet batch per step)
                        "busy_s": 0.0,  # seconds in pipeline calls: busy_s / wall time = device utilisation
                        "encode_s": 0.0}  # seconds in PNG encoding (off the device queue, in a worker thread)
        self._metrics = GeneratorMetrics(self._queue_length)
        # The LRU of subject caches: Serve's multiplexer, whose ids the default router routes by, or a plain one
        # for the subject-affinity router (see routing.py). Both return a ResidentCache for a subject id.
        self._multiplexed = settings.routing == "multiplexed"
        self._hold: Callable[[str], Awaitable[ResidentCache]] = (
            serve.multiplexed(max_num_models_per_replica=settings.max_caches_per_replica)(self._make_cache_loader())
            if self._multiplexed else SubjectLRU(self._make_cache_loader(), settings.max_caches_per_replica))
        self._device = DeviceQueue(self._device_call, settings.max_batch_size, lambda item: item.job.num_images)
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        logger.info("generator %s ready on %s/%s in %.1fs (base model %s)", self.replica, self.device, self.dtype,
                    time.perf_counter() - started, self.pipe.base_model)

    # -- public methods (called by the ingress) -------------------------------------------------------------
    async def describe(self) -> ModelInfo:
        return ModelInfo(self.pipe.base_model, self.pipe.default_resolution, self.replica, str(self.device),
                         str(self.dtype).replace("torch.", ""))

    async def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
        return {"replica": self.replica, "resident": sorted(self._resident), **counts}

    async def subject_info(self, subject_id: str) -> SubjectOutcome | Failure:
        """A subject's metadata; read from the store unless resident, and never loaded into the LRU for it."""
        uri = self.store.uri_for(subject_id)
        try:
            held = self._peek(subject_id)
            nbytes = await asyncio.to_thread(storage.size, uri)
            # Not resident: the file's header says all, no need to fetch its tensors; its size must match the
            # header's, so that a cut-short file answers 409 here as generate does, not 200.
            info = held.info if held is not None else await asyncio.to_thread(read_cache_info, uri, nbytes)
            metadata = subject_metadata(subject_id, info, uri, nbytes)
            return SubjectOutcome(False, metadata, self.replica)
        except (CacheError, storage.StorageError) as exc:
            return _cache_failure(exc, subject_id)

    async def generate(self, job: GenerateJob) -> GenerateResult | Failure:
        held = await self._cache_of(job.subject_id)
        if isinstance(held, Failure):
            return held
        return await self._enqueue(job, *held, _Watch(job.deadline))

    async def generate_events(self, job: GenerateJob) -> AsyncIterator[Progress | GenerateResult | Failure]:
        """``generate`` as a stream (called with ``stream=True``): Progress(0) once the request is queued, then
        Progress per denoising step of its batch, then the result (or a Failure instead of any of these).
        Closing the stream cancels the request; its batch stops if no other request in it is wanted."""
        held = await self._cache_of(job.subject_id)
        if isinstance(held, Failure):
            yield held
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()
        watch = _Watch(job.deadline, on_step=lambda step, steps: loop.call_soon_threadsafe(
            events.put_nowait, Progress(step, steps, self.replica)))
        task = asyncio.ensure_future(self._enqueue(job, *held, watch))
        yield Progress(0, job.steps, self.replica)
        try:
            while not task.done():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({task, next_event}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                else:
                    next_event.cancel()
            while not events.empty():  # steps reported just before the result
                yield events.get_nowait()
            yield task.result()
        finally:  # the consumer went away (Serve cancels a closed stream) or the result is out
            if not task.done():
                watch.cancelled = True
                task.cancel()

    async def forget_subject(self, subject_id: str) -> bool:
        """Drop a deleted subject's cache from this replica's memory (broadcast to every replica by the ingress
        after it deleted the stored cache); whether this replica held it."""
        entry = self._resident.pop(subject_id, None)
        self._fresh.pop(subject_id, None)
        if entry is None:
            return False
        entry.cache = None  # requests already in a batch keep their own reference until it finishes
        if isinstance(self._hold, SubjectLRU):  # Serve's multiplexer cannot drop one entry; this LRU frees the slot
            self._hold.discard(subject_id)
        self._count("forgotten")
        return True

    async def create_subject(self, subject_id: str, uploads: list[Upload]) -> SubjectOutcome | Failure:
        """Cache a subject from its reference images and write it to the store; the same images again: 200."""
        try:
            storage.validate_id(subject_id)  # the ingress checked already; a key must never be built unchecked
        except storage.InvalidId as exc:
            return Failure(422, str(exc), "subject_id")
        images, hashes = [], []
        for upload in uploads:
            try:
                images.append(await asyncio.to_thread(decode_image, upload.data, upload.source, self.limits))
            except ImageDecodeError as exc:
                return image_failure(exc, upload.field)
            hashes.append(sha256_hex(upload.data))
        async with self._create_lock:
            existing = await self._existing(subject_id, tuple(hashes))
            if existing is not None:
                return existing
            settings = self.settings
            async with self._pipe_lock:
                cache = await asyncio.to_thread(
                    self.pipe.cache_subject, images, subject_id=subject_id, source_hashes=hashes,
                    resolution=settings.resolution, preprocess=settings.preprocess,
                    cache_prompt=settings.cache_prompt, seed=settings.cache_seed)
            try:
                uri, nbytes = await asyncio.to_thread(self.store.write, subject_id, cache)
            except storage.StorageError as exc:
                return Failure(503, f"could not write the cache: {exc}")
            self._count("subjects_created")
            # Requests for a new subject are routed here next: keep it warm without reading it back.
            self._fresh[subject_id] = cache
            entry: ResidentCache = await self._hold(subject_id)
            self._fresh.pop(subject_id, None)  # left over when the subject was resident already
            if entry.cache is None:  # an entry of the subject before it was deleted: refill it
                self._revive(entry, cache)
            return SubjectOutcome(True, subject_metadata(subject_id, cache.info, uri, nbytes), self.replica)

    # -- subject caches -------------------------------------------------------------------------------------
    def _make_cache_loader(self):
        async def load_subject_cache(subject_id: str) -> ResidentCache:
            cache = self._fresh.pop(subject_id, None)
            if cache is None:
                cache = await asyncio.to_thread(self.store.read, subject_id, self.pipe.layers, self.pipe.base_model)
                self._count("loads")
            entry = ResidentCache(subject_id, cache.to(self.device, self.dtype), self._evicted)
            self._resident[subject_id] = entry
            return entry

        return load_subject_cache

    def _revive(self, entry: ResidentCache, cache: FeatureCache) -> None:
        entry.cache = cache.to(self.device, self.dtype)
        self._resident[entry.subject_id] = entry

    def _evicted(self, subject_id: str) -> None:
        self._resident.pop(subject_id, None)
        self._count("evictions")

    def _peek(self, subject_id: str) -> FeatureCache | None:
        entry = self._resident.get(subject_id)
        return entry.cache if entry is not None else None

    async def _cache_of(self, subject_id: str) -> tuple[FeatureCache, str] | Failure:
        state = "hit" if subject_id in self._resident else "loaded"
        hint = ": register it with POST /v1/subjects"
        try:
            # An unknown subject must not cost a resident one its LRU slot: check before the LRU loads.
            if state == "loaded" and not await asyncio.to_thread(self.store.exists, subject_id):
                return Failure(404, f"unknown subject {subject_id!r}{hint}")
            held: ResidentCache = await self._hold(subject_id)
            cache = held.cache
            if cache is None:  # deleted since the LRU loaded it, and registered again (it exists): read it anew
                state = "loaded"
                cache = await asyncio.to_thread(self.store.read, subject_id, self.pipe.layers, self.pipe.base_model)
                self._count("loads")
                self._revive(held, cache)
                cache = held.cache
        except (CacheError, storage.StorageError) as exc:
            return _cache_failure(exc, subject_id, unknown_hint=hint, unusable="cannot be used with this model")
        self._metrics.cache_lookups.inc(tags={"result": "hit" if state == "hit" else "loaded"})
        assert cache is not None
        return cache, state

    async def _enqueue(self, job: GenerateJob, cache: FeatureCache, state: str, watch: _Watch
                       ) -> GenerateResult | Failure:
        with self._counts_lock:
            self._waiting.add(id(watch))
            self._metrics.queue_length.set(len(self._waiting))
        try:
            batched = self._run_batch(_BatchItem(job, cache, state, watch))
            # Multiplexed: enqueued with no multiplexed id, so that the batch may mix subjects (see outside_request).
            return await (outside_request(batched) if self._multiplexed else batched)
        except asyncio.CancelledError:  # the caller went away: its batch may stop (see _step_callback)
            watch.cancelled = True
            raise
        finally:
            self._left_queue([watch])

    async def _existing(self, subject_id: str, hashes: tuple[str, ...]) -> SubjectOutcome | Failure | None:
        """The stored subject when it holds exactly these images (200, nothing computed); None to compute."""
        uri = self.store.uri_for(subject_id)
        try:
            data = await asyncio.to_thread(storage.read_bytes, uri)
        except storage.ObjectNotFound:
            return None
        except storage.StorageError as exc:
            return _cache_failure(exc, subject_id)
        try:
            cache = FeatureCache.from_bytes(data, uri)
        except CacheError as exc:
            logger.warning("replacing the unreadable cache of %s: %s", subject_id, exc)
            return None
        if cache.info.source_hashes != hashes:
            return Failure(409, f"subject {subject_id!r} is already registered with other images; "
                                "use another subject_id", "subject_id")
        try:
            cache.validate(uri, self.pipe.layers, self.pipe.base_model)
        except CacheError as exc:
            return Failure(409, f"subject {subject_id!r} was cached for another model: {exc}", "subject_id")
        return SubjectOutcome(False, subject_metadata(subject_id, cache.info, uri, len(data)), self.replica)

    # -- batched generation ---------------------------------------------------------------------------------
    # Batches go on to the device queue, which merges those that wait for the device: many may be in flight.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in, max_concurrent_batches=1024)
    async def _run_batch(self, items: list[_BatchItem]) -> list[GenerateResult | Failure]:
        outcomes = await self._device.submit(items)
        # PNG encoding runs off the device queue: the next call uses the GPU meanwhile.
        return await asyncio.to_thread(self._encode, outcomes)

    async def _device_call(self, items: list[_BatchItem]) -> list[tuple[list[Any], dict] | Failure]:
        async with self._pipe_lock:
            return await asyncio.to_thread(self._generate, items)

    def _queue_length(self) -> int:
        with self._counts_lock:
            return len(self._waiting)

    def _left_queue(self, watches: list[_Watch]) -> None:
        with self._counts_lock:
            self._waiting.difference_update(id(w) for w in watches)
            self._metrics.queue_length.set(len(self._waiting))

    def _generate(self, items: list[_BatchItem]) -> list[tuple[list[Any], dict] | Failure]:
        """Run a batch: one pipeline call per group of requests whose call parameters agree."""
        now = time.time()
        self._left_queue([item.watch for item in items])
        outcomes: list[Any] = [None] * len(items)
        live = [i for i, item in enumerate(items) if item.watch.wanted(now)]
        for i in set(range(len(items))) - set(live):
            outcomes[i] = Failure(504, "the request timed out before a replica could run it") \
                if not items[i].watch.cancelled else Failure(499, "the request was cancelled")
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in live:
            groups[items[i].job.batch_key()].append(i)
        for indices in groups.values():
            group = [items[i] for i in indices]
            # One pipeline call = one UNet batch: what the response and the stats report as "the batch".
            batch = {"batch_images": _images_in(group), "batch_subjects": len({item.job.subject_id for item in group})}
            self._record_batch(batch)
            started = time.perf_counter()
            try:
                images = self._call_pipeline(group)
            except _Stopped as stop:
                self._count("abandoned" if stop.reason == "deadline" else "cancelled")
                self._metrics.stopped.inc(tags={"reason": stop.reason})
                for i in indices:
                    outcomes[i] = Failure(504, "the request timed out while its images were being generated") \
                        if not items[i].watch.cancelled else Failure(499, "the request was cancelled")
                continue
            except torch.cuda.OutOfMemoryError:
                logger.warning("out of device memory for %d request(s)", len(group))
                torch.cuda.empty_cache()
                for i in indices:
                    outcomes[i] = Failure(503, "the replica ran out of device memory; retry, or ask for fewer "
                                               "or smaller images")
                continue
            except Exception as exc:  # noqa: BLE001 - one group's failure must not take the others down
                logger.exception("generation failed for %d request(s)", len(group))
                for i in indices:
                    outcomes[i] = Failure(500, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            info = {**batch, "seconds": time.perf_counter() - started}
            self._count("busy_s", info["seconds"])
            self._metrics.images.inc(batch["batch_images"])
            offset = 0
            for i, item in zip(indices, group):
                outcomes[i] = (images[offset : offset + item.job.num_images],
                               {**info, "cache": item.cache_state, "job": item.job,
                                "cache_fingerprint": item.cache.info.fingerprint()})
                offset += item.job.num_images
        return outcomes

    def _call_pipeline(self, group: list[_BatchItem]) -> list[Any]:
        first = group[0].job
        prompts, caches, negatives, generators = [], [], [], []
        for item in group:
            job = item.job
            for k in range(job.num_images):  # one row per image, each with its own seed
                prompts.append(job.prompt)
                caches.append(item.cache)
                negatives.append(job.negative_prompt or "")
                generators.append(torch.Generator().manual_seed(job.seed + k))
        stopped: list[str] = []  # set by the step callback when it interrupts the call
        images = self.pipe(
            prompts, caches, negative_prompt=negatives, num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale, image_guidance_scale=first.image_guidance_scale,
            guidance=first.guidance, num_images_per_prompt=1, generator=generators,
            height=first.height, width=first.width,
            callback_on_step_end=self._step_callback(group, stopped), callback_on_step_end_tensor_inputs=(),
        ).images
        if stopped:  # the interrupted call decoded half-denoised latents: nobody gets them
            raise _Stopped(stopped[0])
        return images

    def _step_callback(self, group: list[_BatchItem], stopped: list[str]):
        """The pipeline's ``callback_on_step_end``: progress to the requests that stream it, and the interrupt
        (the server-side deadline, and clients that went away) between steps."""
        steps = group[0].job.steps
        watches = [item.watch for item in group]

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            self._count("steps")
            for watch in watches:
                if watch.on_step is not None and not watch.cancelled:
                    watch.on_step(step + 1, steps)
            now = time.time()
            if step + 1 < steps and not any(watch.wanted(now) for watch in watches):
                # A request the ingress gave up on at its deadline is cancelled too: the deadline is the reason.
                stopped.append("deadline" if any(now > watch.deadline for watch in watches) else "cancelled")
                pipe._interrupt = True  # the pipeline skips the remaining steps
            return {}

        return on_step_end

    def _encode(self, outcomes: list[tuple[list[Any], dict] | Failure]) -> list[GenerateResult | Failure]:
        started = time.perf_counter()
        results: list[GenerateResult | Failure] = []
        for outcome in outcomes:
            if isinstance(outcome, Failure):
                results.append(outcome)
                continue
            images, info = outcome
            job: GenerateJob = info["job"]
            base = {k: v for k, v in job.parameters().items() if k != "num_images"}
            # Image k of a request is seed + k: each PNG carries the seed that makes it again alone.
            pngs = [png_bytes(image, {**base, "subject_id": job.subject_id, "seed": job.seed + k}, self.pipe.base_model,
                              info["cache_fingerprint"], compress_level=PNG_COMPRESS_LEVEL) for k, image in enumerate(images)]
            results.append(GenerateResult(pngs, self.replica, info["cache"],
                                          info["batch_images"], info["batch_subjects"], info["seconds"]))
        self._count("encode_s", time.perf_counter() - started)
        return results

    # -- counters -------------------------------------------------------------------------------------------
    def _count(self, name: str, by: float = 1) -> None:
        with self._counts_lock:
            self._counts[name] += by

    def _record_batch(self, batch: dict[str, int]) -> None:
        with self._counts_lock:
            self._counts["batches"] += 1
            self._counts["images"] += batch["batch_images"]
            self._counts["max_batch_subjects"] = max(self._counts["max_batch_subjects"], batch["batch_subjects"])
            self._counts["max_batch_images"] = max(self._counts["max_batch_images"], batch["batch_images"])
        self._metrics.batch_images.observe(batch["batch_images"])
        self._metrics.batch_subjects.observe(batch["batch_subjects"])
