"""Batch generation at catalog scale: subjects x prompts x seeds -> PNG images + a Parquet manifest, on Ray Data.

    config = GenerationJobConfig(model="s3://models/sd21", adapter="s3://models/dreamcache.safetensors",
                                 caches="s3://catalog/caches/manifest.parquet",   # or the cache prefix itself
                                 prompts="s3://catalog/campaign.jsonl", seeds=[0, 1], out="s3://catalog/renders")
    summary = run_generation(config)
    print(summary.contact_sheet_uri)

What lands under ``out``:

    <subject_id>/<prompt-slug>-s<seed>-<key>.png     one image per plan row; <key> hashes every parameter
    manifest.parquet                                 the latest run: one row per plan row (written last)
    _runs/<run_id>/manifest.parquet                  the same, kept per run
    _runs/<run_id>/index.html, sheets/<subject>.png  the run's contact sheet

The plan is subjects x prompts x seeds (or an explicit plan file). Subjects come from a caching manifest (its
``error`` rows become error rows here) or from the ``<subject_id>.safetensors`` files under a cache prefix.
Prompts are a text file (one per line) or JSONL with a per-prompt ``negative_prompt``, ``guidance_scale`` and
``image_guidance_scale``.

**Incremental.** An image's name is a hash of everything that decides its pixels (subject, prompt, negative
prompt, seed, steps, scales, guidance mode, size, model, adapter, dtype, and the subject's reference hashes when
a caching manifest gives them), so "the image exists" means "this row was rendered with these parameters". A
re-run renders only rows without an image: a new subject or prompt renders its rows only, a changed parameter
renders under new names, and rows that failed (a missing or broken cache) are tried again. Objects are written
whole and the manifest last, so an interrupted run resumes where it stopped.

**Ray Data.** Rows are sorted by subject and streamed in blocks to a pool of GPU actors; each actor call renders
one batch (subjects mixed, every sample with its own cache) with one pipeline call per guidance setting, reads
each distinct cache once per batch (and keeps recent ones across batches), and writes the PNGs itself. A missing
or broken cache makes error rows; the job goes on.

**Determinism.** Each image's initial noise comes from a CPU generator seeded with the row's seed, so a row
rendered in the same batch composition on the same hardware gives the same bytes. Floating-point kernels may
round differently for another batch size or composition; a row is never re-rendered once its image exists,
and ``batch_size=1`` makes bytes independent of batching.

The job's parts, one module each: ``generation_settings`` (the config), ``generation_plan`` (rows, image names,
what is already rendered), ``generation_render`` (the actor), ``generation_manifest`` (schemas and Parquet),
``generation_sheets`` (the contact sheet) and ``generation_args`` (the command line). This module drives a run
and re-exports the names of its ``__all__`` (the job's public API), so those imports keep working.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from dreamcache import storage

from .generation_args import add_generation_arguments, config_from_args, summary_lines
from .generation_manifest import (
    MANIFEST_NAME,
    RUNS_DIR,
    manifest_schema,
    plan_schema,
    read_manifest,
    result_row,
    write_parquet,
)
from .generation_plan import PlanRow, build_plan, existing_images, image_name, load_prompts
from .generation_render import CacheReader, GenerationWorker, render_rows
from .generation_settings import GenerationJobConfig, RenderSettings, parse_seeds
from .generation_sheets import write_contact_sheets

logger = logging.getLogger(__name__)


@dataclass
class GenerationSummary:
    run_id: str
    out: str
    manifest_uri: str
    run_manifest_uri: str
    contact_sheet_uri: str | None
    planned: int
    rendered: int
    skipped: int
    failed: int
    elapsed_s: float
    render_s: float  # wall time of the Ray Data stage (0 when nothing was rendered)

    @property
    def images_per_s(self) -> float:
        return self.rendered / self.render_s if self.render_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _check_model_inputs(config: GenerationJobConfig) -> None:
    """Fail before Ray starts when the model or adapter is not there (an actor would fail on each retry)."""
    if not storage.exists(storage.join_uri(config.model, "unet", "config.json")):
        raise ValueError(f"{config.model} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if not storage.exists(config.adapter):
        raise storage.ObjectNotFound(f"adapter file not found: {config.adapter}")


def _actor_resources(config: GenerationJobConfig) -> tuple[float, float]:
    import ray

    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus > 0 else 0.5)
    return gpus, cpus


def _render_with_ray(rows: Sequence[PlanRow], config: GenerationJobConfig) -> list[dict]:
    """Stream the rows through an actor pool; returns one result per row."""
    import pyarrow as pa
    import ray

    gpus, cpus = _actor_resources(config)
    device = config.device if config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    settings = RenderSettings(
        model=config.model, adapter=config.adapter, device=device, dtype=config.dtype, steps=config.steps,
        guidance=config.guidance, height=config.height, width=config.width, torch_threads=config.torch_threads,
        cache_lru_size=config.cache_lru_size,
    )
    # Rows of a subject side by side: a batch holds few subjects, and the next batch reuses the same caches.
    rows = sorted(rows, key=lambda r: (r.subject_id, r.plan_index))
    # Several blocks, each a whole number of batches: every actor gets work, and batches never straddle blocks.
    per_block = config.batch_size * 4
    blocks = [pa.Table.from_pylist([r.record() for r in rows[i : i + per_block]], schema=plan_schema())
              for i in range(0, len(rows), per_block)]
    if config.max_actors is not None:
        pool = ray.data.ActorPoolStrategy(min_size=config.actors, max_size=config.max_actors)
    else:
        pool = ray.data.ActorPoolStrategy(size=config.actors)
    dataset = ray.data.from_arrow(blocks).map_batches(
        GenerationWorker, fn_constructor_kwargs={"settings": settings}, batch_size=config.batch_size,
        batch_format="pyarrow", compute=pool, num_gpus=gpus, num_cpus=cpus,
    )
    logger.info("rendering %d rows: %s actor(s) with %g GPU / %g CPU each, batch %d, device %s",
                len(rows), config.max_actors and f"{config.actors}-{config.max_actors}" or config.actors,
                gpus, cpus, config.batch_size, device)
    results: list[dict] = []
    start = last_log = time.perf_counter()
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        results.extend(table.to_pylist())
        now = time.perf_counter()
        if now - last_log > 10 or len(results) == len(rows):
            ok = sum(r["status"] == "ok" for r in results)
            logger.info("rendered %d/%d rows (%d ok), %.2f rows/s", len(results), len(rows), ok,
                        len(results) / max(now - start, 1e-9))
            last_log = now
    return results


def _manifest_rows(plan: Sequence[PlanRow], rendered: Mapping[int, dict], config: GenerationJobConfig,
                   run_id: str, existing: set[str]) -> list[dict]:
    common = {"guidance": config.guidance, "steps": config.steps, "height": config.height,
              "width": config.width, "run_id": run_id}
    rows = []
    for p in plan:
        if p.plan_index in rendered:
            row = rendered[p.plan_index]
        elif p.error is not None or p.image_uri is None:
            row = result_row(p.record(), "error", "failed", p.error or "no image location")
        elif p.image_uri in existing:
            row = result_row(p.record(), "ok", "skipped")
            row["image_uri"] = p.image_uri
        else:  # the renderer returns a row for every input; reaching this is a bug, and it must still show
            row = result_row(p.record(), "error", "failed", "no result came back from the renderer")
        rows.append({**row, **common})
    return rows


def run_generation(config: GenerationJobConfig) -> GenerationSummary:
    """Plan, skip what exists, render the rest on Ray, draw the contact sheet, write the manifests (last)."""
    start = time.perf_counter()
    config.validate()
    run_id = config.run_id or new_run_id()
    plan = build_plan(config)
    _check_model_inputs(config)
    existing = existing_images(config.out, (p.subject_id for p in plan if p.error is None))
    todo = [p for p in plan if p.error is None and p.image_uri is not None and p.image_uri not in existing]
    logger.info("run %s: %d planned rows, %d already rendered, %d to render, %d without a cache",
                run_id, len(plan), sum(p.image_uri in existing for p in plan), len(todo),
                sum(p.error is not None for p in plan))

    render_s = 0.0
    rendered: dict[int, dict] = {}
    if todo:
        from .ray_runtime import init_ray

        init_ray()
        render_start = time.perf_counter()
        rendered = {r["plan_index"]: r for r in _render_with_ray(todo, config)}
        render_s = time.perf_counter() - render_start

    manifest = _manifest_rows(plan, rendered, config, run_id, existing)
    counts = {
        "planned": len(manifest),
        "rendered": sum(r["action"] == "rendered" for r in manifest),
        "skipped": sum(r["action"] == "skipped" for r in manifest),
        "failed": sum(r["action"] == "failed" for r in manifest),
    }
    run_prefix = storage.join_uri(config.out, RUNS_DIR, run_id)
    sheet_uri = None
    if config.contact_sheet != "none":
        sheet_uri = write_contact_sheets(manifest, config, run_prefix, run_id, counts)
    run_manifest_uri = storage.join_uri(run_prefix, MANIFEST_NAME)
    manifest_uri = storage.join_uri(config.out, MANIFEST_NAME)
    write_parquet(run_manifest_uri, manifest, manifest_schema())
    write_parquet(manifest_uri, manifest, manifest_schema())
    summary = GenerationSummary(
        run_id=run_id, out=config.out, manifest_uri=manifest_uri, run_manifest_uri=run_manifest_uri,
        contact_sheet_uri=sheet_uri, elapsed_s=time.perf_counter() - start, render_s=render_s, **counts,
    )
    logger.info("run %s done: %d rendered, %d skipped, %d failed in %.1f s", run_id, summary.rendered,
                summary.skipped, summary.failed, summary.elapsed_s)
    return summary


__all__ = [
    "GenerationJobConfig", "GenerationSummary", "RenderSettings", "PlanRow", "build_plan", "run_generation",
    "render_rows", "GenerationWorker", "CacheReader", "add_generation_arguments", "config_from_args",
    "parse_seeds", "read_manifest", "existing_images", "image_name", "summary_lines", "load_prompts",
]
