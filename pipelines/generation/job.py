"""Batch generation at catalog scale: subjects x prompts x seeds -> PNG images + a Parquet manifest, on Ray Data.

    config = GenerationJobConfig(model="s3://models/sd21", adapter="s3://models/dreamcache.safetensors",
                                 caches="s3://catalog/caches/manifest.parquet",   # or the cache prefix itself
                                 prompts="s3://catalog/campaign.jsonl", seeds=[0, 1], out="s3://catalog/renders")
    summary = run_generation(config)
    print(summary.contact_sheet_uri)

What lands under ``out``:

    <subject_id>/<prompt-slug>-s<seed>-<key>.png     one image per plan row; <key> hashes every parameter
    _manifests/generation/                           versioned manifest (kernel.manifest): one row per image
                                                     row ever planned here, published in one commit per run
    _runs/<run_id>/index.html, sheets/<subject>.png  the run's contact sheet

The plan is subjects x prompts x seeds (or an explicit plan file). Subjects come from a caching manifest (its
``error`` rows become error rows here) or from the ``<subject_id>.safetensors`` files under a cache prefix.
Prompts are a text file (one per line) or JSONL with a per-prompt ``negative_prompt``, ``guidance_scale`` and
``image_guidance_scale``.

**Incremental.** An image's name is a hash of everything that decides its pixels (subject, prompt, negative
prompt, seed, steps, scales, guidance mode, size, model, adapter, dtype, and the subject's reference hashes when
a caching manifest gives them), so "the image exists" means "this row was rendered with these parameters". A
re-run renders only rows without an image: a new subject or prompt renders its rows only, a changed parameter
renders under new names, and rows that failed (a missing or broken cache) are tried again. "Already rendered" is
decided in the cluster: the plan, a parallel listing of the output prefix and the last manifest are joined by
image URI (an image of another size than the manifest recorded is rendered again). Objects are written whole and
the manifest last, so an interrupted run resumes where it stopped.

**Ray Data.** The plan is expanded from the subjects in the cluster (subjects x prompts x seeds; the prompts and
seeds are small and travel with the tasks); an explicit plan file (Parquet, CSV or JSON lines) is read by Ray tasks,
checked row by row there (a bad row is an error row naming its line) and joined with the subjects by a shuffle
(``plan_file``, ``plan.explicit_plan_dataset``); the driver reads only its head. Rows to render are sorted by
subject (a distributed sort) and streamed to a pool of GPU actors; each actor call renders one batch (subjects
mixed, every sample with its own cache) with one pipeline call per guidance setting, reads each distinct cache once
per batch (and keeps recent ones across batches), and writes the PNGs itself. A missing or broken cache makes error
rows; the job goes on.

**Determinism.** Each image's initial noise comes from a CPU generator seeded with the row's seed, so a row
rendered in the same batch composition on the same hardware gives the same bytes. Floating-point kernels may
round differently for another batch size or composition; a row is never re-rendered once its image exists,
and ``batch_size=1`` makes bytes independent of batching.

The job's parts, one module each: ``settings`` (the config), ``plan`` (rows, image names, what is already rendered),
``plan_file`` (an explicit plan's raw rows), ``render`` (the actor), ``manifest`` (schemas, the versioned manifest),
``sheets`` (the contact sheet) and ``args`` (the command line). This module drives a run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dreamcache import storage

from ..kernel import new_run_id
from ..kernel.listing import list_prefix
from ..kernel.model_info import check_model_inputs
from ..kernel.ray_runtime import check_resources, init_ray
from ..kernel.run import JobRun, Progress, colocate, partitions_for
from .manifest import RUNS_DIR, manifest_log, manifest_schema, result_schema
from .plan import (
    _prior_images,
    _rendered_images,
    check_plan,
    classify_block,
    explicit_plan_dataset,
    load_prompts,
    plan_dataset,
)
from .render import GenerationWorker
from .settings import GenerationJobConfig, RenderSettings
from .sheets import write_contact_sheets

logger = logging.getLogger(__name__)


@dataclass
class GenerationSummary:
    run_id: str
    out: str
    manifest_uri: str  # the commit object of the published version (every row ever planned here)
    run_manifest_uri: str  # this run's rows (the run's data folder)
    contact_sheet_uri: str | None
    planned: int
    rendered: int
    skipped: int
    failed: int
    elapsed_s: float
    render_s: float  # wall time of the rendering pass (0 when nothing was rendered)
    kept: int = 0  # rows of earlier runs carried into the version

    @property
    def images_per_s(self) -> float:
        return self.rendered / self.render_s if self.render_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def _actor_resources(config: GenerationJobConfig) -> tuple[float, float]:
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus > 0 else 0.5)
    return gpus, cpus


def _render(todo, config: GenerationJobConfig):
    """The rows to render, sorted by subject (a batch holds few subjects; the next batch reuses their caches),
    through a pool of actors."""
    gpus, cpus = _actor_resources(config)
    check_resources({"CPU": cpus, "GPU": gpus}, "the generation actors", wait=config.wait_for_resources)
    device = config.device if config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    settings = RenderSettings(
        model=config.model, adapter=config.adapter, device=device, dtype=config.dtype, steps=config.steps,
        guidance=config.guidance, height=config.height, width=config.width, torch_threads=config.torch_threads,
        cache_lru_size=config.cache_lru_size,
    )
    if config.max_actors is not None:
        pool = ray.data.ActorPoolStrategy(min_size=config.actors, max_size=config.max_actors)
    else:
        pool = ray.data.ActorPoolStrategy(size=config.actors)
    logger.info("rendering: %s actor(s) with %g GPU / %g CPU each, batch %d, device %s",
                config.max_actors and f"{config.actors}-{config.max_actors}" or config.actors, gpus, cpus,
                config.batch_size, device)
    # Blocks of a few batches each: every actor gets work, and batches rarely straddle blocks.
    ordered = todo.sort("subject_id").repartition(target_num_rows_per_block=config.batch_size * 4)
    return ordered.map_batches(GenerationWorker, fn_constructor_kwargs={"settings": settings},
                               batch_size=config.batch_size, batch_format="pyarrow", compute=pool, num_gpus=gpus,
                               num_cpus=cpus)


def _decided(batch: pa.Table, todo: bool) -> pa.Table:
    waiting = pc.is_null(batch["status"])
    return batch.filter(waiting if todo else pc.invert(waiting))


def _manifest_rows(batch: pa.Table, common: dict) -> pa.Table:
    for name, value in common.items():
        batch = batch.append_column(name, pa.array([value] * batch.num_rows, manifest_schema().field(name).type))
    return batch


def run_generation(config: GenerationJobConfig) -> GenerationSummary:
    """Plan, skip what exists, render the rest on Ray, publish the manifest, draw the contact sheet."""
    start = time.perf_counter()
    config.validate()
    run_id = config.run_id or new_run_id()
    # What the driver can check of the plan at once: the prompts (a few lines), an explicit plan's head; its rows
    # are read and checked in the cluster, a bad one becoming an error row.
    prompts = load_prompts(config) if config.plan is None else None
    plan_rows = check_plan(config) if config.plan is not None else None
    check_model_inputs(config.model, config.adapter)
    init_ray()
    run = JobRun(manifest_log(config.out), run_id)
    planned = plan_dataset(config, prompts) if prompts is not None else explicit_plan_dataset(config, plan_rows)
    found = list_prefix(config.out).map_batches(_rendered_images, batch_format="pyarrow")
    sources = {"plan": (planned, result_schema()),
               "found": (found, pa.schema([("image_uri", pa.string()), ("image_bytes", pa.int64())]))}
    prior = run.prior(["image_uri", "status", "bytes"])
    if prior is not None:
        sources["prior"] = (prior.map_batches(_prior_images, batch_format="pyarrow"),
                            pa.schema([("image_uri", pa.string()), ("prior_bytes", pa.int64())]))
    rows = colocate(sources, "image_uri", partitions_for(run.parent.rows if run.parent else None)).map_batches(
        classify_block, fn_kwargs={"schema": result_schema()}, batch_format="pyarrow", batch_size=None
    ).materialize()
    total = rows.count()
    todo = rows.map_batches(_decided, fn_kwargs={"todo": True}, batch_format="pyarrow", batch_size=None)
    waiting = todo.count()
    logger.info("run %s: %d planned rows, %d to render", run_id, total, waiting)
    results = rows.map_batches(_decided, fn_kwargs={"todo": False}, batch_format="pyarrow", batch_size=None)
    if waiting:
        results = results.union(_render(todo, config))
    common = {"guidance": config.guidance, "steps": config.steps, "height": config.height, "width": config.width,
              "run_id": run_id}
    results = results.map_batches(_manifest_rows, fn_kwargs={"common": common}, batch_format="pyarrow",
                                  batch_size=None)
    render_start = time.perf_counter()
    with Progress("generation", total) as progress:
        published = run.publish(results, planned=total, label="generation", progress=progress)
    render_s = time.perf_counter() - render_start if waiting else 0.0
    counts = {"planned": total, "rendered": published.count("action:rendered"),
              "skipped": published.count("action:skipped"), "failed": published.count("action:failed")}
    sheet_uri = None
    if config.contact_sheet != "none":
        run_files = [f for f in published.version.files if f.rsplit("/", 1)[-1].startswith("part-")]
        sheet_uri = write_contact_sheets(run_files, config, storage.join_uri(config.out, RUNS_DIR, run_id), run_id,
                                         counts)
    summary = GenerationSummary(
        run_id=run_id, out=config.out, manifest_uri=published.version.uri, run_manifest_uri=run.folder,
        contact_sheet_uri=sheet_uri, elapsed_s=time.perf_counter() - start, render_s=render_s,
        kept=published.kept, **counts,
    )
    logger.info("run %s done: %d rendered, %d skipped, %d failed in %.1f s", run_id, summary.rendered,
                summary.skipped, summary.failed, summary.elapsed_s)
    return summary
