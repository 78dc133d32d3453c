"""Catalog-scale caching: reference images in object storage -> one feature cache per subject + a manifest.

    plan (cluster)  a prefix listed in parallel or a catalog read by Ray Data; references grouped into subjects,
                    joined with the last manifest and the store's listing, classified (``caching.plan``)
    read (CPU)      GET, hash, decode, validate, resize (``caching.stages``)
    compute (pool)  an actor pool batches the references of many subjects through the UNet
    write (CPU)     each cache written whole to <out>/<subject_id>.safetensors
    manifest        workers write the rows; the run publishes them in one commit (``kernel.manifest``):
                    <out>/_manifests/caching/, merged with the rows of subjects this run did not see

Re-running with the same inputs reads nothing it does not have to and writes no duplicate rows; a run killed
half-way publishes nothing and the next one resumes from the caches it had written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from dreamcache import storage

from ..kernel.manifest import ManifestLog
from ..kernel.model_info import native_resolution
from ..kernel.ray_runtime import check_resources
from ..kernel.run import JobRun, Progress, count_rows, new_tally
from .config import KIND, CachingJobConfig
from .plan import LEGACY_COLUMNS, MANIFEST_SCHEMA, plan
from .stages import CacheActor, actor_pool, read_stage, write_stage

logger = logging.getLogger(__name__)


@dataclass
class JobSummary:
    computed: int
    skipped: int
    errors: int
    images: int  # references computed
    seconds: float
    manifest_uri: str  # the commit object of the published version
    kept: int = 0  # rows of earlier runs' subjects carried into this version
    first_result_s: float = 0.0  # until the first computed batch came back: actor pool start-up and model load
    after_first: int = 0  # subjects computed after the first batch, over seconds - first_result_s

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"caching done: {self.computed} computed, {self.skipped} skipped, {self.errors} errors"
                f"{f', {self.kept} earlier rows kept' if self.kept else ''}; {self.images} images in "
                f"{self.seconds:.1f} s ({self.images_per_s:.2f} images/s); manifest {self.manifest_uri}")


def manifest_log(out: str) -> ManifestLog:
    return ManifestLog(out, KIND, MANIFEST_SCHEMA, key="subject_id", legacy_columns=LEGACY_COLUMNS)


def model_version(model: str) -> str:
    """A digest of the model folder's listing (names, sizes, versions): unchanged weights, unchanged digest."""
    digest = hashlib.sha256()
    for obj in storage.list_objects(model):
        digest.update(f"{obj.uri[len(model):]}|{obj.size}|{obj.version}\n".encode())
    return digest.hexdigest()[:16]


def count_caching(table: pa.Table) -> dict[str, int]:
    """Rows by status and action, plus the references computed (the job's images/s)."""
    counts = count_rows(table)
    computed = pc.equal(table["action"], "computed")
    counts["images"] = int(pc.sum(pc.if_else(computed, table["num_references"], 0)).as_py() or 0)
    return counts


def _where(batch: pa.Table, todo: bool) -> pa.Table:
    waiting = pc.is_null(batch["action"])
    return batch.filter(waiting if todo else pc.invert(waiting))


def run_caching(config: CachingJobConfig) -> JobSummary:
    """Run the whole job on the current Ray cluster (see pipelines.kernel.ray_runtime.init_ray)."""
    start, wall_start = time.perf_counter(), time.time()
    resolution = config.resolution or native_resolution(config.model)
    run = JobRun(manifest_log(config.out), config.run_id, count=count_caching)
    logger.info("caching from %s into %s (run %s; last manifest: %s)", config.images or config.catalog,
                config.out, config.run_id, f"version {run.parent.version}" if run.parent else "none")
    tally = new_tally()
    planned = plan(config, run.prior(), model_version(config.model), tally).materialize()
    counts = tally.snapshot()
    total, waiting, seen_before = planned.count(), counts.get("todo", 0), counts.get("seen", 0)
    todo = planned.map_batches(_where, fn_kwargs={"todo": True}, batch_format="pyarrow", batch_size=None)
    logger.info("%d subjects planned: %d unchanged or invalid, %d to compute", total, total - waiting, waiting)
    results = planned.map_batches(_where, fn_kwargs={"todo": False}, batch_format="pyarrow", batch_size=None)
    if waiting:  # nothing new: no actor starts, no model loads
        check_resources({"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor, **(config.actor_resources or {})},
                        "the caching actors", wait=config.wait_for_resources)
        ds = todo.repartition(target_num_rows_per_block=max(1, config.batch_size))  # spread over the read tasks
        ds = ds.map_batches(read_stage, fn_kwargs={"config": config, "resolution": resolution},
                            batch_format="pyarrow", batch_size=max(1, config.batch_size), num_cpus=config.read_cpus)
        ds = ds.map_batches(
            CacheActor, fn_constructor_args=(config,), batch_format="pyarrow", batch_size=config.batch_size,
            compute=actor_pool(config), num_gpus=config.gpus_per_actor, num_cpus=config.cpus_per_actor,
            **({"resources": config.actor_resources} if config.actor_resources else {}),
            # Ray Data's actor pools restart a killed actor and retry its batch (max_restarts and
            # max_task_retries default to -1 there): no subject is lost; tests/test_caching.py kills one.
        )
        ds = ds.map_batches(write_stage, batch_format="pyarrow", batch_size=max(1, config.batch_size),
                            num_cpus=config.read_cpus)
        results = results.union(ds)
    with Progress("caching", total, counter=tally) as progress:
        published = run.publish(results, planned=total, label="caching", progress=progress,
                                seen_before=seen_before)
        first = progress.first("action:computed")
    seconds = time.perf_counter() - start
    summary = JobSummary(
        computed=published.count("action:computed"), skipped=published.count("action:skipped"),
        errors=published.count("status:error"), images=published.count("images"), seconds=seconds,
        manifest_uri=published.version.uri, kept=published.kept,
        first_result_s=progress.started_at - wall_start + first[0] if first else 0.0,
        after_first=published.count("action:computed") - first[1] if first else 0,
    )
    logger.info(summary.line())
    return summary
