"""The DreamBench evaluation as a job: cache the references, generate through the batch path, score, summarise.

    config = EvaluationConfig(dataset="s3://bench/dreambooth/dataset", model="s3://models/sd21base",
                              adapter="s3://runs/sd21/adapter.safetensors", out="s3://bench/eval/run1",
                              dino="s3://models/dino-vits16", clip="s3://models/clip-vit-base-patch32")
    result = run_evaluation(config)

Stages (each a Ray job of its own; caching and generation are incremental, so a rerun computes no cache and
renders no image twice; scoring rescores every image, which is cheap next to generation):

    references   one image per subject: the keep-list file of the DreamBooth dataset (or --references, e.g.
                 background-removed copies), written as a caching catalog <out>/references.jsonl
    caching      pipelines.caching.run_caching -> <out>/caches/<subject>.safetensors + manifest
    generation   pipelines.generation.run_generation with an explicit plan (subject x 25 prompts, seeds
                 seed..seed+3) -> <out>/images/<subject>/*.png + manifest + contact sheet
    scoring      a Ray Data actor pool loads DINO and CLIP once per actor, embeds each subject's source images
                 once, and scores every generated image -> <out>/scores.parquet (one row per image)
    summary      overall / objects / live, next to the paper's numbers -> <out>/summary.md, summary.json

The DreamBooth dataset layout is ``<dataset>/<subject>/<NN>.jpg`` (google/dreambooth ``dataset/``). DINO and CLIP-I
are reported against all real images of a subject (standard DreamBench) and against the single reference.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray

from dreamcache import storage
from dreamcache.dreambench import (
    REFERENCE_IMAGES,
    SCORE_COLUMNS,
    dreambench_prompts,
    subject_kind,
    summarize_scores,
    summary_markdown,
)
from dreamcache.images import decode_image
from dreamcache.metrics import MetricBackbones

from ..caching import CachingJobConfig, run_caching
from ..generation import GenerationJobConfig, read_manifest, run_generation
from .config import EvaluationConfig, EvaluationInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class EvaluationResult:
    summary: dict[str, dict]
    scores_uri: str
    summary_uri: str
    generation_manifest_uri: str
    contact_sheet_uri: str | None
    images_scored: int
    images_failed: int
    elapsed_s: float
    markdown: str = field(repr=False, default="")


# -- inputs --------------------------------------------------------------------------------------------------------
def _images_under(prefix: str) -> list[str]:
    return [uri for uri in storage.list_files(prefix) if uri.lower().endswith(IMAGE_SUFFIXES)
            and "/." not in uri[len(prefix.rstrip("/")):]]


def subject_sources(config: EvaluationConfig) -> dict[str, dict[str, list[str]]]:
    """Per subject: ``all`` real images of the dataset and the single ``ref`` image used for its cache."""
    sources = {}
    for subject in config.subject_list:
        folder = storage.join_uri(config.dataset, subject)
        images = _images_under(folder)
        if not images:
            raise EvaluationInputError(f"no images for subject {subject!r} under {folder}")
        reference = _reference_for(config, subject, images)
        sources[subject] = {"all": images, "ref": [reference]}
    return sources


def _reference_for(config: EvaluationConfig, subject: str, dataset_images: list[str]) -> str:
    if config.references is None:
        wanted = storage.join_uri(config.dataset, subject, REFERENCE_IMAGES[subject])
        if wanted not in dataset_images:
            raise EvaluationInputError(f"the keep-list reference {wanted} is missing")
        return wanted
    candidates = _images_under(storage.join_uri(config.references, subject))
    if not candidates:
        for suffix in IMAGE_SUFFIXES:
            flat = storage.join_uri(config.references, subject + suffix)
            if storage.exists(flat):
                candidates = [flat]
                break
    if not candidates:
        raise EvaluationInputError(f"no reference for subject {subject!r} under {config.references}")
    keep = [c for c in candidates if c.rsplit("/", 1)[-1].split(".")[0] == REFERENCE_IMAGES[subject].split(".")[0]]
    return (keep or sorted(candidates))[0]


def evaluation_plan(config: EvaluationConfig) -> list[dict]:
    """The generation plan: one row per (subject, prompt); the seeds come from the generation config."""
    return [{"subject_id": p.subject, "prompt": p.prompt}
            for p in dreambench_prompts(config.subject_list, config.prompts_per_subject)]


def _backbone_name(config: EvaluationConfig) -> str | None:
    if config.backbone:
        return config.backbone
    from dreamcache.adapters import backbone_family

    try:
        unet = json.loads(storage.read_bytes(storage.join_uri(config.model, "unet", "config.json")))
    except (storage.StorageError, ValueError):
        return None
    return {"sd21": "SD 2.1", "sd15": "SD 1.5"}.get(backbone_family(unet))


# -- stages --------------------------------------------------------------------------------------------------------
def cache_references(config: EvaluationConfig, sources: dict[str, dict[str, list[str]]]) -> str:
    """Caches of the subjects' references through the caching job; returns its output prefix (the generation job
    reads the caching manifest there)."""
    catalog = config.uri("references.jsonl")
    lines = [json.dumps({"subject_id": s, "image_uri": src["ref"][0]}) for s, src in sources.items()]
    storage.write_bytes(catalog, ("\n".join(lines) + "\n").encode())
    gpus = _gpus(config)
    caching = CachingJobConfig(out=config.uri("caches"), model=config.model, catalog=catalog, actors=config.actors,
                               gpus_per_actor=gpus, cpus_per_actor=config.cpus_per_actor or (1.0 if gpus else 0.5),
                               batch_size=config.batch_size, cache_prompt=config.cache_prompt,
                               seed=config.seed, dtype=config.dtype)
    summary = run_caching(caching)
    logger.info(summary.line())
    if summary.errors:
        raise EvaluationInputError(f"{summary.errors} reference(s) could not be cached; see {summary.manifest_uri}")
    return config.uri("caches")


def generate(config: EvaluationConfig, caches: str):
    """Every benchmark image through the batch generation job (incremental)."""
    generation = GenerationJobConfig(
        model=config.model, adapter=config.adapter, caches=caches, plan=evaluation_plan(config),
        subjects=config.subject_list, seeds=[config.seed + i for i in range(config.images_per_prompt)],
        out=config.uri("images"), steps=config.steps, guidance_scale=config.guidance_scale,
        image_guidance_scale=config.image_guidance_scale, guidance=config.guidance,
        negative_prompt=config.negative_prompt, height=config.height, width=config.width,
        batch_size=config.batch_size, actors=config.actors, gpus_per_actor=config.gpus_per_actor,
        cpus_per_actor=config.cpus_per_actor, dtype=config.dtype, run_id=config.run_id,
    )
    return run_generation(generation)


def _gpus(config: EvaluationConfig) -> float:
    if config.gpus_per_actor is not None:
        return config.gpus_per_actor

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


class ScoreActor:
    """Loads the metric backbones once; embeds each subject's source images once; scores generated images."""

    def __init__(self, backbones: MetricBackbones, sources: dict[str, dict[str, list[str]]], batch_size: int) -> None:
        import torch

        from dreamcache.metrics import DreamBenchScorer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = DreamBenchScorer.from_pretrained(backbones, device, batch_size)
        self.sources = sources
        self.embedded: dict[str, dict[str, dict]] = {}

    def _source_sets(self, subject: str) -> dict[str, dict]:
        if subject not in self.embedded:
            self.embedded[subject] = {name: self.scorer.embed_sources([_load(uri) for uri in uris])
                                      for name, uris in self.sources[subject].items()}
        return self.embedded[subject]

    def __call__(self, batch):
        rows = batch.to_pylist()
        by_subject: dict[str, list[dict]] = {}
        for row in rows:
            by_subject.setdefault(row["subject"], []).append(row)
        out = []
        for subject, group in by_subject.items():
            images, kept = [], []
            for row in group:
                try:
                    images.append(_load(row["image_uri"]))
                    kept.append(row)
                except (storage.StorageError, ValueError) as exc:
                    out.append({**row, **{c: None for c in SCORE_COLUMNS}, "status": "error", "error": str(exc)})
            if kept:
                scores = self.scorer.score(images, [r["eval_caption"] for r in kept], self._source_sets(subject))
                for i, row in enumerate(kept):
                    out.append({**row, **{c: scores[c][i] for c in SCORE_COLUMNS}, "status": "ok", "error": None})
        return pa.Table.from_pylist(out, schema=scores_schema())


def _load(uri: str):
    return decode_image(storage.read_bytes(uri), uri)


def scores_schema():
    return pa.schema([("subject", pa.string()), ("kind", pa.string()), ("prompt_index", pa.int32()),
                      ("prompt", pa.string()), ("eval_caption", pa.string()), ("seed", pa.int64()),
                      ("image_uri", pa.string())]
                     + [(c, pa.float64()) for c in SCORE_COLUMNS]
                     + [("status", pa.string()), ("error", pa.string())])


def score_images(config: EvaluationConfig, manifest: Sequence[dict], sources: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Per-image scores for the manifest's rendered images; failed generations become error rows."""
    prompts = {(p.subject, p.prompt): p for p in dreambench_prompts(config.subject_list, config.prompts_per_subject)}
    todo, failed = [], []
    for row in manifest:
        cell = prompts.get((row["subject_id"], row["prompt"]))
        if cell is None:
            continue  # a row of another run sharing this output folder
        record = {"subject": cell.subject, "kind": cell.kind, "prompt_index": cell.prompt_index, "prompt": cell.prompt,
                  "eval_caption": cell.eval_caption, "seed": row["seed"], "image_uri": row["image_uri"]}
        if row["status"] == "ok":
            todo.append(record)
        else:
            failed.append({**record, **{c: None for c in SCORE_COLUMNS}, "status": "error", "error": row["error"]})
    if not todo:
        return failed
    gpus = _gpus(config)
    backbones = MetricBackbones(dino=config.dino, clip=config.clip)
    dataset = ray.data.from_arrow(pa.Table.from_pylist(todo, schema=pa.schema(list(scores_schema())[:7])))
    scored = dataset.map_batches(
        ScoreActor, fn_constructor_args=(backbones, sources, config.score_batch_size), batch_format="pyarrow",
        batch_size=config.score_batch_size, compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=gpus, num_cpus=config.cpus_per_actor or (1.0 if gpus else 0.5),
    )
    return scored.take_all() + failed


def write_scores(uri: str, rows: Sequence[dict]) -> None:
    ordered = sorted(rows, key=lambda r: (r["subject"], r["prompt_index"], r["seed"]))
    storage.write_parquet(uri, pa.Table.from_pylist(ordered, schema=scores_schema()))


def run_evaluation(config: EvaluationConfig) -> EvaluationResult:
    """The whole protocol on the current Ray (``pipelines.kernel.ray_runtime.init_ray``); caching and generation are
    incremental, scoring is redone."""
    start = time.perf_counter()
    config.validate()
    sources = subject_sources(config)
    logger.info("DreamBench: %d subjects x %d prompts x %d images", len(sources), config.prompts_per_subject,
                config.images_per_prompt)
    caches = config.caches or cache_references(config, sources)
    generation = generate(config, caches)

    manifest = read_manifest(generation.manifest_uri)
    rows = score_images(config, manifest, sources)
    scored = [r for r in rows if r["status"] == "ok"]
    if not scored:
        raise RuntimeError(f"no image could be scored; see {generation.manifest_uri}")
    scores_uri = config.uri("scores.parquet")
    write_scores(scores_uri, rows)
    summary = summarize_scores(scored)
    markdown = summary_markdown(summary, _backbone_name(config))
    details = {"config": {k: v for k, v in asdict(config).items() if k != "subjects"}, "subjects": list(sources),
               "summary": summary, "images_failed": len(rows) - len(scored),
               "generation_manifest": generation.manifest_uri, "per_subject_kind": {s: subject_kind(s) for s in sources}}
    summary_uri = config.uri("summary.md")
    storage.write_bytes(config.uri("summary.json"), json.dumps(details, indent=2, default=str).encode())
    storage.write_bytes(summary_uri, markdown.encode())
    return EvaluationResult(summary=summary, scores_uri=scores_uri, summary_uri=summary_uri,
                            generation_manifest_uri=generation.manifest_uri,
                            contact_sheet_uri=generation.contact_sheet_uri, images_scored=len(scored),
                            images_failed=len(rows) - len(scored), elapsed_s=time.perf_counter() - start,
                            markdown=markdown)


def result_lines(result: EvaluationResult) -> list[str]:
    lines = [result.markdown,
             f"scores:  {result.scores_uri}  ({result.images_scored} images scored, {result.images_failed} failed)",
             f"summary: {result.summary_uri}"]
    if result.contact_sheet_uri:
        lines.append(f"contact sheet: {result.contact_sheet_uri}")
    return lines
