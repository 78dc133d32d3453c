"""Catalog-scale caching: reference images in object storage -> one feature cache per subject + a manifest.

Stages (Ray Data, streaming):

    plan (driver)   list PREFIX/<subject_id>/<images> or read a catalog; validate ids; join the last manifest
    read (CPU)      per subject: unchanged since the last run? -> skip without reading; else GET, hash, decode,
                    validate and resize every image (one shared decoder, dreamcache.images)
    compute (pool)  an actor pool (model loaded once per actor, GPUs settable) batches the references of many
                    subjects through the UNet; a cache already in the store with the same sources, base model
                    and settings (a resumed run) is not recomputed
    write (CPU)     each cache written whole to <out>/<subject_id>.safetensors
    manifest        <out>/manifest.parquet, written last: exactly one row per input subject, ok or error

Re-running with the same inputs reads nothing it does not have to and writes no duplicate rows; a run killed
half-way resumes from the caches it had written.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from dreamcache import storage
from dreamcache.cache_store import CacheStore
from dreamcache.images import ImageDecodeError, ImageLimits

from .model_info import native_resolution

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"

MANIFEST_SCHEMA = pa.schema([
    ("subject_id", pa.string()),
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),
    ("retryable", pa.bool_()),  # a storage or compute failure (retried next run), not bad input (kept until it changes)
    ("cache_uri", pa.string()),
    ("source_uris", pa.list_(pa.string())),
    ("source_hashes", pa.list_(pa.string())),
    ("source_versions", pa.list_(pa.string())),  # ETags (or size-mtime locally): the cheap "unchanged?" test
    ("num_references", pa.int32()),
    ("bytes", pa.int64()),
    ("base_model", pa.string()),
    ("settings", pa.string()),  # JSON of the cache settings; a change recomputes
    ("model_version", pa.string()),  # digest of the model folder's listing
    ("action", pa.string()),  # computed | skipped | failed
    ("run_id", pa.string()),
    ("read_s", pa.float64()),
    ("compute_s", pa.float64()),
    ("write_s", pa.float64()),
])
# Rows between stages carry, besides the manifest columns, what only travels from one stage to the next.
WORK_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [
    ("pixels", pa.list_(pa.binary())),  # prepared RGB references (read -> compute)
    ("prior", pa.string()),  # JSON of this subject's row in the last manifest (plan -> read)
    ("cache_bytes", pa.binary()),  # the cache file (compute -> write)
    ("stored_cache", pa.string()),  # JSON of a cache already in the store: its size (plan), then its base model
                                    # if it was made from these sources and settings (read -> compute)
])


class JobInputError(ValueError):
    """The job's inputs cannot be used at all (as opposed to one bad subject, which becomes an error row)."""


@dataclass
class CachingJobConfig:
    out: str  # prefix (folder or s3://) for <subject_id>.safetensors and manifest.parquet
    model: str  # diffusers SD folder, local or s3://
    images: str | None = None  # PREFIX/<subject_id>/<image files>
    catalog: str | None = None  # Parquet / CSV / JSONL with subject_id, image_uri
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5  # fractional: on a 2-CPU machine two 1-CPU actors would starve the read tasks
    read_cpus: float = 0.25
    batch_size: int = 8  # subjects per actor batch
    # Batches in flight per actor: while one holds the model, another's input is prepared and the last one's
    # caches are serialized (the model part itself runs one batch at a time, see CacheActor). 2 beat 1 in steady
    # state on an H100 (52.7 vs 35.9 subjects/s) and on a 2-core CPU (39.3 vs 35.4): bench/caching_job.py.
    actor_concurrency: int = 2
    resolution: int | None = None
    preprocess: str = "resize"
    cache_prompt: str = ""
    seed: int = 0
    dtype: str = "auto"
    max_image_bytes: int = ImageLimits.max_bytes
    max_image_pixels: int = ImageLimits.max_pixels
    max_references: int = 16
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])

    def __post_init__(self) -> None:
        if (self.images is None) == (self.catalog is None):
            raise JobInputError("give exactly one of images (a prefix) or catalog (a file)")
        if self.actors < 1 or self.batch_size < 1 or self.actor_concurrency < 1:
            raise JobInputError("actors, batch_size and actor_concurrency must be >= 1")
        if self.preprocess not in ("resize", "pad"):
            raise JobInputError(f"preprocess must be resize or pad, got {self.preprocess!r}")

    def settings(self) -> str:
        """What besides sources and model determines a cache; part of the skip test."""
        return json.dumps({"resolution": self.resolution, "preprocess": self.preprocess,
                           "cache_prompt": self.cache_prompt, "seed": self.seed}, sort_keys=True)

    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


@dataclass
class JobSummary:
    computed: int
    skipped: int
    errors: int
    images: int  # references computed
    seconds: float
    manifest_uri: str
    first_result_s: float = 0.0  # until the first batch came back: actor pool start-up and model load
    after_first: int = 0  # subjects finished after the first batch, over seconds - first_result_s

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"caching done: {self.computed} computed, {self.skipped} skipped, {self.errors} errors; "
                f"{self.images} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s); manifest {self.manifest_uri}")


# -- plan ------------------------------------------------------------------------------------------------------
@dataclass
class _Subject:
    subject_id: str
    uris: list[str] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    error: str | None = None


def _plan_from_prefix(prefix: str) -> list[_Subject]:
    subjects: OrderedDict[str, _Subject] = OrderedDict()
    base = prefix.rstrip("/") + "/"
    for obj in storage.list_objects(prefix):
        parts = obj.uri[len(base):].split("/")
        if len(parts) < 2:
            subject = subjects.setdefault(parts[0], _Subject(parts[0]))
            subject.error = f"{obj.uri} is not inside a <subject_id>/ folder"
            continue
        if parts[-1].startswith("."):  # hidden files (.DS_Store, editor droppings) are not references
            continue
        subject = subjects.setdefault(parts[0], _Subject(parts[0]))
        # Every other file is a reference; one that is not an image becomes this subject's error row.
        subject.uris.append(obj.uri)
        subject.versions.append(obj.version)
    return list(subjects.values())


def _read_catalog(uri: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    data = storage.read_bytes(uri)
    suffix = PurePosixPath(storage.parse_uri(uri).path).suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(io.BytesIO(data))
        elif suffix == ".csv":
            table = pacsv.read_csv(io.BytesIO(data))
        elif suffix in (".jsonl", ".json", ".ndjson"):
            table = pajson.read_json(io.BytesIO(data))
        else:
            raise JobInputError(f"catalog {uri}: unknown format {suffix!r} (use .parquet, .csv or .jsonl)")
    except pa.ArrowInvalid as exc:
        raise JobInputError(f"catalog {uri} cannot be parsed: {exc}") from None
    missing = {"subject_id", "image_uri"} - set(table.column_names)
    if missing:
        raise JobInputError(f"catalog {uri} lacks columns {sorted(missing)}")
    return table


def _plan_from_catalog(uri: str) -> list[_Subject]:
    table = _read_catalog(uri)
    subjects: OrderedDict[str, _Subject] = OrderedDict()
    for row, (subject_id, image_uri) in enumerate(zip(table["subject_id"].to_pylist(), table["image_uri"].to_pylist())):
        key = "" if subject_id is None else str(subject_id)
        subject = subjects.setdefault(key, _Subject(key))
        if not image_uri:
            subject.error = f"catalog row {row} has no image_uri"
            continue
        subject.uris.append(str(image_uri))
        subject.versions.append(None)  # looked up by the read stage, in parallel
    return list(subjects.values())


def _read_manifest(out: str) -> dict[str, dict]:
    uri = storage.join_uri(out, MANIFEST_NAME)
    try:
        table = storage.read_parquet(uri)
    except storage.ObjectNotFound:
        return {}
    return {row["subject_id"]: row for row in table.to_pylist()}


def model_version(model: str) -> str:
    """A digest of the model folder's listing (names, sizes, versions): unchanged weights, unchanged digest."""
    import hashlib

    objects = storage.list_objects(model)
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(f"{obj.uri[len(model):]}|{obj.size}|{obj.version}\n".encode())
    return digest.hexdigest()[:16]


def plan(config: CachingJobConfig) -> list[dict]:
    """One work row per input subject, with the subject's last manifest row attached (as JSON)."""
    subjects = _plan_from_prefix(config.images) if config.images else _plan_from_catalog(config.catalog)
    prior = _read_manifest(config.out)
    version = model_version(config.model)
    settings = config.settings()
    store = CacheStore(config.out)
    # One listing of the store says which subjects already have a cache file (a run killed before its manifest)
    # and its size: only those get a header read in the read stage, instead of one GET per subject.
    stored_bytes = {obj.uri: obj.size for obj in storage.list_objects(config.out)}
    rows = []
    for subject in subjects:
        row = _empty_row(subject.subject_id, config.run_id)
        row.update(source_uris=subject.uris, source_versions=[v or "" for v in subject.versions],
                   model_version=version, settings=settings, num_references=len(subject.uris))
        try:
            storage.validate_id(subject.subject_id)
            row["cache_uri"] = store.uri_for(subject.subject_id)
        except storage.InvalidId as exc:
            subject.error = str(exc)
        if subject.error is None and not subject.uris:
            subject.error = "no images"
        if subject.error is None and len(subject.uris) > config.max_references:
            subject.error = f"{len(subject.uris)} images exceed the limit of {config.max_references} references"
        if subject.error is not None:
            _fail(row, subject.error, retryable=False)
        if subject.subject_id in prior:
            row["prior"] = json.dumps(prior[subject.subject_id], default=str)
        if row["cache_uri"] in stored_bytes:
            row["stored_cache"] = json.dumps({"bytes": stored_bytes[row["cache_uri"]]})
        rows.append(row)
    return rows


def _fail(row: dict, reason: str, retryable: bool) -> None:
    row.update(status="error", error=reason, retryable=retryable, action="failed", cache_uri=None, pixels=[],
               cache_bytes=None)


def _retryable(exc: Exception) -> bool:
    """Bad or missing input stays bad until it changes; other storage failures may pass."""
    return not isinstance(exc, (ImageDecodeError, storage.ObjectNotFound))


def _empty_row(subject_id: str, run_id: str) -> dict:
    row = {f.name: None for f in WORK_SCHEMA}
    row.update(subject_id=subject_id, status="ok", run_id=run_id, source_uris=[], source_hashes=[],
               source_versions=[], pixels=[], bytes=0, num_references=0, read_s=0.0, compute_s=0.0, write_s=0.0)
    return row


# -- stages ----------------------------------------------------------------------------------------------------
def _unchanged(row: dict, prior: dict | None) -> bool:
    """Same sources (by version), same model files, same settings, and the last run made this cache (or found
    these very inputs bad: a corrupt image stays corrupt until it is replaced)."""
    finished = prior and (prior.get("status") == "ok" or prior.get("retryable") is False)
    return bool(
        finished and prior.get("source_uris") == row["source_uris"]
        and prior.get("source_versions") == row["source_versions"] and all(row["source_versions"])
        and prior.get("model_version") == row["model_version"] and prior.get("settings") == row["settings"]
    )


def read_stage(batch: pa.Table, config: CachingJobConfig, resolution: int) -> pa.Table:
    """CPU stage: fetch, hash, decode, validate and resize every reference of each subject."""
    limits = config.limits()
    rows = [_read_subject(row, config, (resolution, resolution), limits) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def _read_subject(row: dict, config: CachingJobConfig, size: tuple[int, int], limits: ImageLimits) -> dict:
    from dreamcache.images import decode_image, prepare_reference, sha256_hex

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
        _fail(row, str(exc), retryable=_retryable(exc))
    else:
        row["stored_cache"] = _stored_cache(row, config, size)
    row["read_s"] = time.perf_counter() - start
    return row


def _stored_cache(row: dict, config: CachingJobConfig, size: tuple[int, int]) -> str | None:
    """A resumed run (killed before its manifest): the store may already hold this subject's cache from these
    very sources and settings. Its header is read here, in the parallel CPU stage, so that the actor only
    compares the base-model fingerprint (known once the model is loaded) and its GPU never waits on storage."""
    from dreamcache.cache_info import CACHE_TIMESTEP, CacheError
    from dreamcache.cache_store import read_cache_info

    if row["stored_cache"] is None:  # the plan's listing found no cache file
        return None
    try:
        info = read_cache_info(row["cache_uri"])
    except (storage.StorageError, CacheError):
        return None  # gone meanwhile, or not one we can trust: compute it
    same = (info.timestep == CACHE_TIMESTEP
            and list(info.source_hashes) == row["source_hashes"] and info.cache_prompt == config.cache_prompt
            and info.preprocess == config.preprocess and info.seed == config.seed and info.resolution == size)
    if not same:
        return None
    return json.dumps({"base_model": info.base_model, "bytes": json.loads(row["stored_cache"])["bytes"]})


def version_stage(batch: pa.Table) -> pa.Table:
    """CPU stage for catalog input: each image's version from one HEAD (in parallel, no body read)."""
    rows = batch.to_pylist()
    for row in rows:
        if row["status"] != "ok":
            continue
        try:
            row["source_versions"] = [storage.stat(uri).version for uri in row["source_uris"]]
        except storage.StorageError as exc:
            _fail(row, str(exc), retryable=_retryable(exc))
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def split_unchanged(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows finished without work: errors and unchanged subjects carried over, rows to compute)."""
    done, todo = [], []
    for row in rows:
        prior = json.loads(row["prior"]) if row["prior"] else None
        if row["status"] == "error":
            done.append(row)
        elif _unchanged(row, prior):
            row.update(action="skipped", source_hashes=prior["source_hashes"], base_model=prior["base_model"],
                       bytes=prior["bytes"], status=prior["status"], error=prior["error"],
                       retryable=prior["retryable"], cache_uri=prior["cache_uri"])
            done.append(row)
        else:
            todo.append(row)
    return done, todo


class CacheActor:
    """GPU (or CPU) actor: loads the pipeline once, turns batches of subjects into cache files' bytes.

    Ray Data may run ``actor_concurrency`` calls at once in this actor's threads. Only ``build_caches`` (image
    tensors, VAE encode, UNet, copy back to the host) holds ``_model_lock``, because the feature hooks live on
    the shared UNet; turning the rows into images before it and serializing the caches after it run outside,
    overlapped with another batch's model work. ``compute_s`` in the manifest is the time under the lock.
    """

    def __init__(self, config: CachingJobConfig) -> None:
        import torch

        from dreamcache.cli import pick_dtype
        from dreamcache.pipeline import DreamCachePipeline

        self.config = config
        self.device = torch.device("cuda" if config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.pipe = DreamCachePipeline.from_pretrained(config.model, torch_dtype=pick_dtype(config.dtype, self.device))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)  # Ray Data shows the job's progress
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
                    _fail(row, f"computation failed: {exc}", retryable=True)
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
        import numpy as np
        from PIL import Image

        from dreamcache.cache import FeatureCache

        shape = (self.resolution, self.resolution, 3)
        images = [Image.fromarray(np.frombuffer(p, np.uint8).reshape(shape)) for row in rows for p in row["pixels"]]
        hashes = [h for row in rows for h in row["source_hashes"]]
        with self._model_lock:
            start = time.perf_counter()
            built = self.pipe.build_caches(
                images, hashes, resolution=self.resolution, preprocess=self.config.preprocess,
                cache_prompt=self.config.cache_prompt, seed=self.config.seed, batch_size=self.config.batch_size,
            )
            # Back on the host before the lock goes: a later copy would queue behind the next batch's kernels,
            # and the device copies are freed before the next batch needs the memory.
            caches = iter([cache.to("cpu") for cache in built])
            del built
            model_s = time.perf_counter() - start
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
            _fail(row, f"writing the cache failed: {exc}", retryable=True)
        row["write_s"] = time.perf_counter() - start
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


# -- the job ---------------------------------------------------------------------------------------------------
def _manifest_table(rows: Iterable[dict]) -> pa.Table:
    names = MANIFEST_SCHEMA.names
    ordered = sorted(({k: row.get(k) for k in names} for row in rows), key=lambda r: r["subject_id"])
    return pa.Table.from_pylist(ordered, schema=MANIFEST_SCHEMA)


def write_manifest(out: str, rows: Iterable[dict]) -> str:
    uri = storage.join_uri(out, MANIFEST_NAME)
    storage.write_parquet(uri, _manifest_table(rows))  # whole object: readers see the old or the new manifest
    return uri


def _resolution(config: CachingJobConfig) -> int:
    """The reference size: given, or the model's native one (from its configs: no weights on the driver)."""
    return config.resolution or native_resolution(config.model)


def _dataset(rows: list[dict], config: CachingJobConfig):
    import ray

    blocks = max(1, min(len(rows), 200, -(-len(rows) // config.batch_size)))
    return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=WORK_SCHEMA)).repartition(blocks)


def run_caching(config: CachingJobConfig) -> JobSummary:
    """Run the whole job on the current Ray cluster (see pipelines.ray_runtime.init_ray)."""
    start = time.perf_counter()
    rows = plan(config)
    resolution = _resolution(config)
    logger.info("caching %d subjects from %s into %s (run %s)", len(rows), config.images or config.catalog,
                config.out, config.run_id)
    if any(row["status"] == "ok" and not all(row["source_versions"]) for row in rows):
        rows = _dataset(rows, config).map_batches(version_stage, batch_format="pyarrow", num_cpus=config.read_cpus,
                                                  batch_size=64).take_all()
    results, todo = split_unchanged(rows)
    first_result_s, after_first = 0.0, 0
    logger.info("%d subjects unchanged or invalid, %d to compute", len(results), len(todo))
    if todo:  # nothing new: no actor starts, no model loads
        ds = _dataset(todo, config)
        ds = ds.map_batches(read_stage, fn_kwargs={"config": config, "resolution": resolution},
                            batch_format="pyarrow", batch_size=max(1, config.batch_size), num_cpus=config.read_cpus)
        ds = ds.map_batches(
            CacheActor, fn_constructor_args=(config,), batch_format="pyarrow", batch_size=config.batch_size,
            compute=actor_pool(config), num_gpus=config.gpus_per_actor,
            num_cpus=config.cpus_per_actor,
            # Ray Data's actor pools restart a killed actor and retry its batch (max_restarts and
            # max_task_retries default to -1 there): no subject is lost; tests/test_caching.py kills one.
        )
        ds = ds.map_batches(write_stage, batch_format="pyarrow", batch_size=max(1, config.batch_size),
                            num_cpus=config.read_cpus)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if not first_result_s:
                first_result_s = time.perf_counter() - start
            else:
                after_first += batch.num_rows
            results.extend(batch.to_pylist())
    manifest_uri = write_manifest(config.out, results)
    actions = [row["action"] for row in results]
    summary = JobSummary(
        computed=actions.count("computed"), skipped=actions.count("skipped"),
        errors=sum(row["status"] == "error" for row in results),
        images=sum(row["num_references"] for row in results if row["action"] == "computed"),
        seconds=time.perf_counter() - start, manifest_uri=manifest_uri, first_result_s=first_result_s,
        after_first=after_first,
    )
    if len(results) != len(rows):  # every input subject ends in exactly one row
        raise RuntimeError(f"{len(rows)} subjects planned but {len(results)} manifest rows produced")
    logger.info(summary.line())
    return summary

