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
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from dreamcache import storage
from dreamcache.cache_store import CacheStore

from . import contact_sheet

logger = logging.getLogger(__name__)

# Bump when the naming or the rendering changes in a way that should re-render every image.
GENERATION_FORMAT = "dreamcache-generation-1"
MANIFEST_NAME = "manifest.parquet"
RUNS_DIR = "_runs"  # starts with "_": never a valid subject id, so it cannot collide with a subject folder
RESERVED_SUBJECT_IDS = frozenset({MANIFEST_NAME})
PROMPT_KEYS = frozenset({"prompt", "negative_prompt", "guidance_scale", "image_guidance_scale"})
PLAN_KEYS = PROMPT_KEYS | {"subject_id", "seed"}
ContactSheetMode = Literal["new", "all", "none"]


# =============================================================================================================
# Settings
# =============================================================================================================
@dataclass
class GenerationJobConfig:
    """Everything a generation run needs. ``prompts``/``plan``/``subjects`` take a URI or the values themselves
    (what a program such as an evaluation job passes)."""

    model: str  # diffusers SD folder: local path or s3:// prefix
    adapter: str  # adapter safetensors file
    caches: str  # a cache prefix (<subject_id>.safetensors files) or a caching manifest (*.parquet)
    prompts: str | Sequence[str | Mapping[str, Any]] | None = None  # text/JSONL file, or the prompts
    plan: str | Sequence[Mapping[str, Any]] | None = None  # explicit rows (JSONL/Parquet file, or dicts)
    subjects: Sequence[str] | None = None  # only these subjects (default: every subject of ``caches``)
    seeds: Sequence[int] = (0,)
    out: str = "dreamcache-generations"
    steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 0.4
    guidance: Literal["compositional", "joint"] = "compositional"
    negative_prompt: str | None = None  # default for prompts that do not name one
    height: int | None = None  # None: the model's default resolution
    width: int | None = None
    batch_size: int = 8
    actors: int = 1  # actor pool size (the minimum when max_actors is set)
    max_actors: int | None = None  # autoscale the pool up to this many actors
    gpus_per_actor: float | None = None  # None: 1 if the Ray cluster has GPUs now, else 0
    cpus_per_actor: float | None = None  # None: 1 with a GPU, 0.5 without (two CPU actors fit on 2 cores)
    device: str = "auto"  # auto: cuda when the actor has a GPU
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    torch_threads: int | None = None  # CPU threads per actor (None: Ray's default)
    cache_lru_size: int = 32  # caches kept per actor across batches
    contact_sheet: ContactSheetMode = "new"  # subjects with rows rendered or failed this run / all / none
    contact_sheet_cell: int = 160
    contact_sheet_max_subjects: int = 1000
    run_id: str | None = None

    def validate(self) -> None:
        if (self.prompts is None) == (self.plan is None):
            raise ValueError("give exactly one of prompts (with subjects x seeds) or an explicit plan")
        for name in ("steps", "batch_size", "actors", "cache_lru_size", "contact_sheet_cell"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= actors ({self.actors})")
        if self.guidance not in ("compositional", "joint"):
            raise ValueError(f"guidance must be 'compositional' or 'joint', got {self.guidance!r}")
        if self.dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, fp16, bf16 or fp32, got {self.dtype!r}")
        if self.contact_sheet not in ("new", "all", "none"):
            raise ValueError(f"contact_sheet must be new, all or none, got {self.contact_sheet!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if not list(self.seeds):
            raise ValueError("at least one seed is required")
        for seed in self.seeds:
            check_seed(seed)
        if self.run_id is not None:
            storage.validate_id(self.run_id, "run id")


@dataclass(frozen=True)
class RenderSettings:
    """What every actor needs to render: the same for all rows of a run."""

    model: str
    adapter: str
    device: str
    dtype: str
    steps: int
    guidance: str
    height: int | None
    width: int | None
    torch_threads: int | None = None
    cache_lru_size: int = 32


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


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"a seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5"`` or ranges ``"0-3"`` (inclusive), mixed: ``"0-3,10"``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"bad seed list {text!r}: use numbers and ranges like 0,1,5 or 0-3") from None
        seeds.extend(check_seed(v) for v in values)
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return list(dict.fromkeys(seeds))


# =============================================================================================================
# The plan
# =============================================================================================================
@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str
    guidance_scale: float
    image_guidance_scale: float


@dataclass(frozen=True)
class SubjectSource:
    """Where a subject's cache is, or why there is none."""

    subject_id: str
    cache_uri: str | None
    cache_version: str = ""  # hash of the reference images when a caching manifest names them
    error: str | None = None


@dataclass(frozen=True)
class PlanRow:
    plan_index: int
    subject_id: str
    prompt_index: int
    prompt: PromptSpec
    seed: int
    cache_uri: str | None
    row_key: str
    image_uri: str | None
    parameters: str  # JSON of everything hashed into row_key
    error: str | None = None  # known before rendering (no cache, caching failed, unsafe id)

    def record(self) -> dict:
        """The Arrow row sent to the actors."""
        return {
            "plan_index": self.plan_index, "row_key": self.row_key, "subject_id": self.subject_id,
            "prompt_index": self.prompt_index, "prompt": self.prompt.prompt,
            "negative_prompt": self.prompt.negative_prompt, "seed": self.seed,
            "guidance_scale": self.prompt.guidance_scale, "image_guidance_scale": self.prompt.image_guidance_scale,
            "parameters": self.parameters, "cache_uri": self.cache_uri, "image_uri": self.image_uri,
        }


def _read_text(uri: str, what: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {uri} is not UTF-8 text: {exc}") from None


def _json_lines(text: str, source: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row | {"__line__": number})
    return rows


def _is_jsonl(uri: str, text: str) -> bool:
    if uri.lower().endswith((".jsonl", ".ndjson", ".json")):
        return True
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    return first.startswith("{")


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def prompt_spec(entry: str | Mapping[str, Any], config: GenerationJobConfig, where: str) -> PromptSpec:
    """One prompt with the job's defaults filled in; unknown keys are refused (a typo must not pass silently)."""
    if isinstance(entry, str):
        entry = {"prompt": entry}
    unknown = set(entry) - PROMPT_KEYS - {"__line__", "subject_id", "seed"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    negative = entry.get("negative_prompt", config.negative_prompt)
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: negative_prompt must be a string, got {negative!r}")
    return PromptSpec(
        prompt=prompt.strip(),
        negative_prompt=(negative or "").strip(),
        guidance_scale=_number(entry.get("guidance_scale", config.guidance_scale), "guidance_scale", where),
        image_guidance_scale=_number(entry.get("image_guidance_scale", config.image_guidance_scale),
                                     "image_guidance_scale", where),
    )


def load_prompts(config: GenerationJobConfig) -> list[PromptSpec]:
    """The prompts of ``config.prompts`` (a file URI or values), duplicates dropped, order kept."""
    source = config.prompts
    if isinstance(source, str):
        text = _read_text(source, "prompts file")
        if _is_jsonl(source, text):
            entries: list = _json_lines(text, source)
            places = [f"{source} line {e['__line__']}" for e in entries]
        else:
            numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
            entries = [line for _, line in numbered if line and not line.startswith("#")]
            places = [f"{source} line {n}" for n, line in numbered if line and not line.startswith("#")]
    else:
        entries = list(source or [])
        places = [f"prompt {i}" for i in range(len(entries))]
    specs = list(dict.fromkeys(prompt_spec(e, config, where) for e, where in zip(entries, places)))
    if not specs:
        raise ValueError(f"no prompts in {source!r}")
    return specs


def _caching_manifest_subjects(uri: str) -> list[SubjectSource]:
    """Subjects of a caching job's manifest: ``ok`` rows point at their cache, ``error`` rows carry the reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"caching manifest {uri} is not a readable Parquet file: {exc}") from None
    missing = {"subject_id", "status", "cache_uri"} - set(table.column_names)
    if missing:
        raise ValueError(f"caching manifest {uri} lacks column(s) {sorted(missing)}")
    sources: dict[str, SubjectSource] = {}
    for row in table.to_pylist():
        subject = row["subject_id"]
        if subject in sources:
            logger.warning("caching manifest %s lists subject %r twice; using its first row", uri, subject)
            continue
        hashes = row.get("source_hashes") or []
        version = hashlib.sha256(json.dumps([row.get("base_model") or "", list(hashes)]).encode()).hexdigest()[:16] \
            if hashes else ""
        if row["status"] != "ok" or not row["cache_uri"]:
            reason = row.get("error") or f"status {row['status']!r} without a cache"
            sources[subject] = SubjectSource(subject, None, version, f"caching failed: {reason}")
        else:
            sources[subject] = SubjectSource(subject, row["cache_uri"], version)
    return list(sources.values())


def load_subjects(config: GenerationJobConfig) -> dict[str, SubjectSource]:
    """Every subject the caches know, by id (a caching manifest if ``caches`` ends in .parquet, else the
    ``<subject_id>.safetensors`` files under the prefix)."""
    if config.caches.lower().endswith(".parquet"):
        sources = _caching_manifest_subjects(config.caches)
    else:
        store = CacheStore(config.caches)
        sources = [SubjectSource(s, store.uri_for(s)) for s in store.subjects()]
    return {s.subject_id: s for s in sources}


def _id_problem(subject_id: Any) -> str | None:
    """Why ``subject_id`` cannot name a folder under ``out`` (None when it can)."""
    try:
        storage.validate_id(subject_id)
    except storage.InvalidId as exc:
        return str(exc)
    if subject_id in RESERVED_SUBJECT_IDS:
        return f"subject id {subject_id!r} is reserved in the output layout"
    return None


def _subject_source(subject_id: Any, known: Mapping[str, SubjectSource], caches: str) -> SubjectSource:
    problem = _id_problem(subject_id)
    if problem is not None:
        return SubjectSource(str(subject_id), None, error=problem)
    return known.get(subject_id) or SubjectSource(subject_id, None, error=f"no cache for subject {subject_id!r} in {caches}")


def _plan_file_rows(source: str | Sequence[Mapping[str, Any]]) -> list[tuple[dict, str]]:
    """(row, where) from a JSONL or Parquet plan file, or from dicts."""
    if not isinstance(source, str):
        return [(dict(row), f"plan row {i}") for i, row in enumerate(source)]
    if source.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(pa.BufferReader(storage.read_bytes(source))).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"plan {source} is not a readable Parquet file: {exc}") from None
        return [({k: v for k, v in r.items() if v is not None}, f"{source} row {i}") for i, r in enumerate(rows)]
    return [(row, f"{source} line {row['__line__']}") for row in _json_lines(_read_text(source, "plan file"), source)]


def _requested_rows(config: GenerationJobConfig) -> Iterable[tuple[Any, PromptSpec, int]]:
    """(subject id, prompt, seed) in plan order, before any lookup."""
    if config.plan is None:
        prompts = load_prompts(config)
        subjects = list(config.subjects) if config.subjects is not None else sorted(load_subjects(config))
        if not subjects:
            raise ValueError(f"no subjects: {config.caches} holds no caches")
        for subject in dict.fromkeys(subjects):
            for prompt in prompts:
                for seed in config.seeds:
                    yield subject, prompt, seed
        return
    rows = _plan_file_rows(config.plan)
    if not rows:
        raise ValueError(f"the plan {config.plan!r} has no rows")
    wanted = set(config.subjects) if config.subjects is not None else None
    for row, where in rows:
        unknown = set(row) - PLAN_KEYS - {"__line__"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
        if "subject_id" not in row:
            raise ValueError(f"{where}: 'subject_id' is required")
        if wanted is not None and row["subject_id"] not in wanted:
            continue
        prompt = prompt_spec(row, config, where)
        seeds = [check_seed(row["seed"])] if "seed" in row else list(config.seeds)
        for seed in seeds:
            yield row["subject_id"], prompt, seed


def row_parameters(config: GenerationJobConfig, subject: SubjectSource, prompt: PromptSpec, seed: int) -> dict:
    """Everything that decides an image's pixels; its hash names the image."""
    return {
        "format": GENERATION_FORMAT, "subject_id": subject.subject_id, "cache_version": subject.cache_version,
        "prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt, "seed": seed,
        "guidance_scale": prompt.guidance_scale, "image_guidance_scale": prompt.image_guidance_scale,
        "guidance": config.guidance, "steps": config.steps, "height": config.height, "width": config.width,
        "model": storage.parse_uri(config.model).uri, "adapter": storage.parse_uri(config.adapter).uri,
        "dtype": config.dtype,
    }


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "prompt"


def image_name(parameters: Mapping[str, Any]) -> tuple[str, str]:
    """(row key, file name): readable prefix, hash of the parameters."""
    key = hashlib.sha256(json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return key, f"{_slug(parameters['prompt'])}-s{parameters['seed']}-{key[:16]}.png"


def build_plan(config: GenerationJobConfig) -> list[PlanRow]:
    """Every row of the run, in plan order, each with its image URI (or the reason it cannot be rendered).
    Rows with the same parameters appear once."""
    known = load_subjects(config)
    prompt_index: dict[PromptSpec, int] = {}
    rows: list[PlanRow] = []
    seen: set[str] = set()
    for subject_id, prompt, seed in _requested_rows(config):
        subject = _subject_source(subject_id, known, config.caches)
        parameters = row_parameters(config, subject, prompt, seed)
        key, name = image_name(parameters)
        if key in seen:
            continue
        seen.add(key)
        image_uri = storage.join_uri(config.out, subject.subject_id, name) if _id_problem(subject.subject_id) is None else None
        rows.append(PlanRow(
            plan_index=len(rows), subject_id=subject.subject_id, prompt_index=prompt_index.setdefault(prompt, len(prompt_index)),
            prompt=prompt, seed=seed, cache_uri=subject.cache_uri, row_key=key, image_uri=image_uri,
            parameters=json.dumps(parameters, sort_keys=True), error=subject.error,
        ))
    return rows


def existing_images(out: str, subjects: Iterable[str], threads: int = 16) -> set[str]:
    """URIs of the PNGs already in the subjects' folders under ``out``: one listing per subject folder (in
    parallel), not one request per row, and never the growing ``_runs/`` folder."""
    from concurrent.futures import ThreadPoolExecutor

    folders = [storage.join_uri(out, s) for s in dict.fromkeys(subjects) if _id_problem(s) is None]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        listings = pool.map(storage.list_files, folders)
        found = {uri for listing in listings for uri in listing if uri.endswith(".png")}
    logger.info("%d images already under %s (%d subject folders listed)", len(found), out, len(folders))
    return found


# =============================================================================================================
# Rendering (runs inside the actors; no Ray here)
# =============================================================================================================
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


def encode_png(image, parameters: str) -> bytes:
    """PNG with the row's parameters in a text chunk; the same image and parameters give the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dreamcache", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _result(row: Mapping, status: str, action: str, error: str | None = None, **timings) -> dict:
    result = {**row, "status": status, "action": action, "error": error, "bytes": None, "cache_read_s": 0.0,
              "generate_s": 0.0, "write_s": 0.0, "started_at": None, "finished_at": None}
    result.update(timings)
    if status != "ok":
        result["image_uri"] = None
    return result


def render_rows(pipe, rows: Sequence[Mapping], settings: RenderSettings, caches: CacheReader) -> list[dict]:
    """Render a batch of plan records with ``pipe``; one result per record, errors included.

    Caches are read once per distinct URI; rows that share guidance settings go through one pipeline call
    (a call may mix subjects: one cache per prompt)."""
    import torch

    from dreamcache.cache import CacheError

    results: dict[int, dict] = {}
    loaded: dict[str, Any] = {}
    read_time: dict[str, float] = {}
    for uri in dict.fromkeys(r["cache_uri"] for r in rows):
        try:
            loaded[uri], read_time[uri] = caches.get(uri)
        except (CacheError, storage.StorageError, ValueError) as exc:
            for r in rows:
                if r["cache_uri"] == uri:
                    results[r["plan_index"]] = _result(r, "error", "failed", f"cache unusable: {exc}")
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
                results[r["plan_index"]] = _result(r, "error", "failed", f"generation failed: {type(exc).__name__}: {exc}")
            continue
        generate_s = (time.time() - started) / len(group)
        for r, image in zip(group, images):
            write_start = time.perf_counter()
            try:
                data = encode_png(image, r["parameters"])
                storage.write_bytes(r["image_uri"], data)
            except storage.StorageError as exc:
                results[r["plan_index"]] = _result(r, "error", "failed", f"writing {r['image_uri']}: {exc}")
                continue
            results[r["plan_index"]] = _result(
                r, "ok", "rendered", bytes=len(data), generate_s=generate_s,
                cache_read_s=read_time[r["cache_uri"]] / readers[r["cache_uri"]],
                write_s=time.perf_counter() - write_start, started_at=started, finished_at=time.time(),
            )
    return [results[r["plan_index"]] for r in rows]


def load_render_pipeline(settings: RenderSettings):
    """The pipeline on its device and dtype, quiet, from the model and adapter URIs."""
    import torch

    from dreamcache.cli import pick_device, pick_dtype, quiet_libraries
    from dreamcache.pipeline import DreamCachePipeline

    quiet_libraries()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    pipe = DreamCachePipeline.from_pretrained(settings.model, adapter=settings.adapter,
                                              torch_dtype=pick_dtype(settings.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class GenerationWorker:
    """The Ray Data actor: loads the pipeline once, renders one batch (an Arrow table of plan records) per call."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        self.pipe = load_render_pipeline(settings)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        # Kept on the device: a subject spanning several batches is copied there once.
        self.caches = CacheReader(lambda uri: self.pipe.load_cache(uri).to(device, dtype), settings.cache_lru_size)

    def __call__(self, batch):
        import pyarrow as pa

        results = render_rows(self.pipe, batch.to_pylist(), self.settings, self.caches)
        return pa.Table.from_pylist(results, schema=result_schema())


# =============================================================================================================
# Manifest
# =============================================================================================================
def plan_schema():
    import pyarrow as pa

    return pa.schema([
        ("plan_index", pa.int64()), ("row_key", pa.string()), ("subject_id", pa.string()),
        ("prompt_index", pa.int32()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
        ("seed", pa.int64()), ("guidance_scale", pa.float64()), ("image_guidance_scale", pa.float64()),
        ("parameters", pa.string()), ("cache_uri", pa.string()), ("image_uri", pa.string()),
    ])


def result_schema():
    import pyarrow as pa

    return pa.schema(list(plan_schema()) + [
        ("status", pa.string()), ("action", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
        ("cache_read_s", pa.float64()), ("generate_s", pa.float64()), ("write_s", pa.float64()),
        ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ])


def manifest_schema():
    """One row per plan row: what was asked (subject, prompt, seed, parameters), what happened (status
    ok/error, action rendered/skipped/failed, error), where the image is, and timings."""
    import pyarrow as pa

    return pa.schema(list(result_schema()) + [
        ("guidance", pa.string()), ("steps", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
        ("run_id", pa.string()),
    ])


def write_parquet(uri: str, rows: Sequence[Mapping], schema) -> None:
    """Write a whole Parquet object at once (atomic put or rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes())


def read_manifest(uri: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(storage.read_bytes(uri))).to_pylist()


# =============================================================================================================
# The job
# =============================================================================================================
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
            row = _result(p.record(), "error", "failed", p.error or "no image location")
        elif p.image_uri in existing:
            row = _result(p.record(), "ok", "skipped")
            row["image_uri"] = p.image_uri
        else:  # the renderer returns a row for every input; reaching this is a bug, and it must still show
            row = _result(p.record(), "error", "failed", "no result came back from the renderer")
        rows.append({**row, **common})
    return rows


def _contact_sheets(manifest: Sequence[Mapping], config: GenerationJobConfig, run_prefix: str, run_id: str,
                    counts: Mapping[str, int]) -> str:
    """Draw the sheets (one Ray task per subject) and write the index; returns the index URI."""
    touched = {r["subject_id"] for r in manifest if r["action"] != "skipped"} if config.contact_sheet == "new" \
        else {r["subject_id"] for r in manifest}
    by_subject: dict[str, list[Mapping]] = {}
    for r in manifest:
        if r["subject_id"] in touched:
            by_subject.setdefault(r["subject_id"], []).append(r)
    drawable = [s for s in sorted(by_subject) if _id_problem(s) is None][: config.contact_sheet_max_subjects]
    records = []
    for subject in drawable:
        subject_rows = by_subject[subject]
        columns = sorted({r["prompt_index"] for r in subject_rows})
        seeds = sorted({r["seed"] for r in subject_rows})
        cells = [contact_sheet.SheetCell(columns.index(r["prompt_index"]), seeds.index(r["seed"]),
                                         r["image_uri"], r["error"]) for r in subject_rows]
        records.append(contact_sheet.subject_sheet_record(subject, columns, seeds, cells))
    sheets_prefix = storage.join_uri(run_prefix, "sheets")
    if records:
        import ray

        from .ray_runtime import init_ray

        init_ray()  # already up when rows were rendered; a run with only failed rows still draws their sheets
        ray.data.from_items(records).map(
            contact_sheet.render_subject_sheet, fn_kwargs={"sheets_prefix": sheets_prefix, "cell": config.contact_sheet_cell},
            num_cpus=0.25,
        ).materialize()
    legend: dict[int, tuple] = {}
    for r in manifest:
        legend.setdefault(r["prompt_index"], (r["prompt_index"], r["prompt"], r["negative_prompt"] or "", r["guidance_scale"]))
    subjects = [
        contact_sheet.SubjectSummary(s, sum(r["status"] == "ok" for r in rows), sum(r["status"] != "ok" for r in rows),
                                     f"sheets/{s}.png" if s in drawable else None)
        for s, rows in sorted(by_subject.items())
    ]
    errors = [(r["subject_id"], r["prompt"], r["seed"], r["error"] or "") for r in manifest if r["status"] != "ok"]
    note = "" if by_subject else "Nothing was rendered or failed in this run: every image already existed."
    if len(drawable) < len(by_subject):
        note = f"Sheets drawn for the first {len(drawable)} of {len(by_subject)} subjects."
    index_uri = storage.join_uri(run_prefix, "index.html")
    page = contact_sheet.index_html(run_id, counts, [legend[k] for k in sorted(legend)], subjects,
                                    errors[: contact_sheet.MAX_ERRORS_LISTED], note)
    storage.write_bytes(index_uri, page.encode("utf-8"))
    return index_uri


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
        sheet_uri = _contact_sheets(manifest, config, run_prefix, run_id, counts)
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


# =============================================================================================================
# Command line (shared by jobs/generate_batch.py and a `dreamcache generate-batch` subcommand)
# =============================================================================================================
def summary_lines(summary: GenerationSummary) -> list[str]:
    lines = [f"run {summary.run_id}: {summary.planned} planned, {summary.rendered} rendered, "
             f"{summary.skipped} already there, {summary.failed} failed ({summary.elapsed_s:.1f} s)",
             f"manifest:      {summary.manifest_uri}"]
    if summary.contact_sheet_uri:
        lines.append(f"contact sheet: {summary.contact_sheet_uri}")
    return lines


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder: local path or s3:// prefix")
    p.add_argument("--adapter", required=True, help="adapter safetensors file (path or s3:// URI)")
    p.add_argument("--caches", required=True,
                   help="cache prefix (<subject_id>.safetensors files) or a caching manifest (.parquet)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompts", help="prompts file: one prompt per line, or JSONL with prompt, negative_prompt, "
                                        "guidance_scale, image_guidance_scale")
    what.add_argument("--plan", help="explicit plan (JSONL or Parquet): subject_id, prompt, [seed, negative_prompt, "
                                     "guidance_scale, image_guidance_scale]")
    p.add_argument("--subjects", help="comma-separated subject ids (default: every subject of --caches)")
    p.add_argument("--subjects-file", help="file of subject ids, one per line")
    p.add_argument("--seeds", default="0", help="seeds per prompt: 0,1,5 or 0-3 (default 0)")
    p.add_argument("--out", default=GenerationJobConfig.out, help="output folder or s3:// prefix")
    p.add_argument("--steps", type=int, default=GenerationJobConfig.steps)
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                   default=GenerationJobConfig.guidance_scale, help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=GenerationJobConfig.image_guidance_scale)
    p.add_argument("--guidance-mode", choices=["compositional", "joint"], default=GenerationJobConfig.guidance)
    p.add_argument("--negative-prompt", help="negative prompt for prompts that do not name one")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=GenerationJobConfig.batch_size)
    p.add_argument("--actors", type=int, default=GenerationJobConfig.actors, help="actor pool size")
    p.add_argument("--max-actors", type=int, help="autoscale the actor pool up to this many")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs now, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="default: 1 with a GPU, 0.5 without")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--contact-sheet", choices=["new", "all", "none"], default="new",
                   help="sheets for subjects touched this run (new), every subject (all), or none")
    p.add_argument("--contact-sheet-cell", type=int, default=GenerationJobConfig.contact_sheet_cell)
    p.add_argument("--run-id", help="name of this run (default: UTC time + random suffix)")


def config_from_args(args: argparse.Namespace) -> GenerationJobConfig:
    subjects: list[str] | None = None
    if args.subjects is not None or args.subjects_file is not None:
        subjects = [s.strip() for s in (args.subjects or "").split(",") if s.strip()]
        if args.subjects_file:
            subjects += [line.strip() for line in _read_text(args.subjects_file, "subjects file").splitlines()
                         if line.strip() and not line.lstrip().startswith("#")]
        if not subjects:
            raise ValueError("--subjects/--subjects-file name no subject")
    return GenerationJobConfig(
        model=args.model, adapter=args.adapter, caches=args.caches, prompts=args.prompts, plan=args.plan,
        subjects=subjects, seeds=parse_seeds(args.seeds), out=args.out, steps=args.steps,
        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
        guidance=args.guidance_mode, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        batch_size=args.batch_size, actors=args.actors, max_actors=args.max_actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, device=args.device,
        dtype=args.dtype, torch_threads=args.torch_threads, contact_sheet=args.contact_sheet,
        contact_sheet_cell=args.contact_sheet_cell, run_id=args.run_id,
    )


__all__ = [
    "GenerationJobConfig", "GenerationSummary", "RenderSettings", "PlanRow", "build_plan", "run_generation",
    "render_rows", "GenerationWorker", "CacheReader", "add_generation_arguments", "config_from_args",
    "parse_seeds", "read_manifest", "existing_images", "image_name", "summary_lines",
]
