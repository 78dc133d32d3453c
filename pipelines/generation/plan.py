"""The plan of a generation run: subjects x prompts x seeds (or an explicit plan file) -> rows, each with the
deterministic name of its image, and the check of which images are already rendered. The job builds both kinds
of plan as datasets, in the cluster (:func:`plan_dataset`, :func:`explicit_plan_dataset`); :func:`build_plan` builds
the same rows in one process, for tests and small tools.

An image's name hashes everything that decides its pixels, so "the image exists" means "this row was rendered
with these parameters" (see ``pipelines.generation``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from dreamcache import storage
from dreamcache.cache_store import CACHE_SUFFIX, CacheStore
from dreamcache.errors import InvalidValue
from dreamcache.image_files import image_name, parameters_key

from ..kernel.listing import list_prefix, read_parquet_files
from ..kernel.manifest import ManifestLog
from ..kernel.run import colocate, partitions_for, split_sources
from .manifest import MANIFEST_NAME, result_row, result_schema
from .plan_file import check_plan_file, data_lines, raw_plan_dataset, raw_plan_tables
from .settings import GenerationJobConfig, check_seed

logger = logging.getLogger(__name__)

# Bump when the naming or the rendering changes in a way that should re-render every image.
GENERATION_FORMAT = "dreamcache-generation-1"
RESERVED_SUBJECT_IDS = frozenset({MANIFEST_NAME})
PROMPT_KEYS = frozenset({"prompt", "negative_prompt", "guidance_scale", "image_guidance_scale"})
PLAN_KEYS = PROMPT_KEYS | {"subject_id", "seed"}


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
    cache_version: str = ""  # what the cache was made from (model, images, settings), from a caching manifest
    error: str | None = None


@dataclass(frozen=True)
class PlanRow:
    plan_index: int
    subject_id: str
    prompt_index: int | None  # None: a plan row that could not be read (no prompt, no seed: never drawn)
    prompt: PromptSpec
    seed: int | None
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

    def result(self) -> dict:
        """The record as a result row: an error now when it is known before rendering, else still to decide."""
        return result_row(self.record(), "error", "failed", self.error) if self.error else \
            result_row(self.record(), None, None)


def read_text(uri: str, what: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidValue(f"{what} {uri} is not UTF-8 text: {exc}") from None


def _json_object(text: str, where: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidValue(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise InvalidValue(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _json_lines(text: str, source: str) -> list[dict]:
    return [_json_object(line, f"{source} line {number}") | {"__line__": number} for number, line in data_lines(text)]


def _is_jsonl(uri: str, text: str) -> bool:
    if uri.lower().endswith((".jsonl", ".ndjson", ".json")):
        return True
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    return first.startswith("{")


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def prompt_spec(entry: str | Mapping[str, Any], config: GenerationJobConfig, where: str) -> PromptSpec:
    """One prompt with the job's defaults filled in; unknown keys are refused (a typo must not pass silently)."""
    if isinstance(entry, str):
        entry = {"prompt": entry}
    unknown = set(entry) - PROMPT_KEYS - {"__line__", "subject_id", "seed"}
    if unknown:
        raise InvalidValue(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidValue(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    negative = entry.get("negative_prompt", config.negative_prompt)
    if negative is not None and not isinstance(negative, str):
        raise InvalidValue(f"{where}: negative_prompt must be a string, got {negative!r}")
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
        text = read_text(source, "prompts file")
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
        raise InvalidValue(f"no prompts in {source!r}")
    return specs


def _caching_manifest_subjects(uri: str) -> list[SubjectSource]:
    """Subjects of a caching job's single-file manifest: ``ok`` rows point at their cache, ``error`` rows carry
    the reason."""
    try:
        table = storage.read_parquet(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidValue(f"caching manifest {uri} is not a readable Parquet file: {exc}") from None
    missing = {"subject_id", "status", "cache_uri"} - set(table.column_names)
    if missing:
        raise InvalidValue(f"caching manifest {uri} lacks column(s) {sorted(missing)}")
    return _sources(_subjects_from_caching_rows(table).to_pylist(), uri)


def _sources(rows: Iterable[Mapping], where: str) -> list[SubjectSource]:
    sources: dict[str, SubjectSource] = {}
    for row in rows:
        if row["subject_id"] in sources:
            logger.warning("caching manifest %s lists subject %r twice; using its first row", where, row["subject_id"])
            continue
        sources[row["subject_id"]] = SubjectSource(row["subject_id"], row["cache_uri"], row["cache_version"] or "",
                                                   row["error"])
    return list(sources.values())


def load_subjects(config: GenerationJobConfig) -> dict[str, SubjectSource]:
    """Every subject the caches know, by id, on the driver (explicit plans; the expanded plan reads them as a
    dataset, :func:`subjects_dataset`): a caching manifest file, a caching job's output prefix, or the
    ``<subject_id>.safetensors`` files under a prefix."""
    if config.caches.lower().endswith(".parquet"):
        sources = _caching_manifest_subjects(config.caches)
    else:
        caching = ManifestLog(config.caches, "caching", _caching_view(), key="subject_id",
                              legacy_columns=("cache_uri", "source_uris", "status"))
        version = caching.current()
        if version is not None:
            rows = (r for batch in caching.iter_batches(version)
                    for r in _subjects_from_caching_rows(pa.Table.from_batches([batch])).to_pylist())
            sources = _sources(rows, version.uri)
        else:
            store = CacheStore(config.caches)
            sources = [SubjectSource(s, store.uri_for(s)) for s in store.subjects()]
    return {s.subject_id: s for s in sources}


def id_problem(subject_id: Any) -> str | None:
    """Why ``subject_id`` cannot name a folder under ``out`` (None when it can)."""
    try:
        storage.validate_id(subject_id)
    except storage.InvalidId as exc:
        return str(exc)
    if subject_id in RESERVED_SUBJECT_IDS:
        return f"subject id {subject_id!r} is reserved in the output layout"
    return None


def _subject_source(subject_id: Any, known: Mapping[str, SubjectSource], caches: str) -> SubjectSource:
    problem = id_problem(subject_id)
    if problem is not None:
        return SubjectSource(str(subject_id), None, error=problem)
    return known.get(subject_id) or SubjectSource(subject_id, None, error=f"no cache for subject {subject_id!r} in {caches}")


def plan_request(row: Mapping[str, Any], config: GenerationJobConfig, where: str) -> tuple[str, PromptSpec, list[int]]:
    """One explicit plan row checked: its subject, its prompt with the job's defaults, its seeds (the row's own, or
    the job's). :class:`InvalidValue` says what is wrong, starting with ``where``."""
    unknown = set(row) - PLAN_KEYS
    if unknown:
        raise InvalidValue(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
    if "subject_id" not in row:
        raise InvalidValue(f"{where}: 'subject_id' is required")
    if not isinstance(row["subject_id"], str):
        raise InvalidValue(f"{where}: subject_id must be a string, got {row['subject_id']!r}")
    prompt = prompt_spec(row, config, where)
    try:
        seeds = [check_seed(row["seed"])] if "seed" in row else list(config.seeds)
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None
    return row["subject_id"], prompt, seeds


def request_schema():
    """A checked plan row (``problem`` set: it could not be read, and becomes one error row)."""
    return pa.schema([("order", pa.int64()), ("where", pa.string()), ("subject_id", pa.string()),
                      ("prompt", pa.string()), ("negative_prompt", pa.string()), ("guidance_scale", pa.float64()),
                      ("image_guidance_scale", pa.float64()), ("seeds", pa.list_(pa.int64())),
                      ("problem", pa.string())])


def requests_block(batch, config: GenerationJobConfig):
    """Raw plan rows (``plan_file.RAW_SCHEMA``) -> checked requests; a bad row keeps the subject it names, if any,
    so its error row sits with that subject's rows."""
    rows = []
    for order, where, text in zip(batch["order"].to_pylist(), batch["where"].to_pylist(), batch["row"].to_pylist()):
        row: Any = None
        try:
            if text is None:
                raise InvalidValue(f"{where}: not UTF-8 text")
            row = _json_object(text, where)
            subject, prompt, seeds = plan_request(row, config, where)
        except InvalidValue as exc:
            named = row.get("subject_id") if isinstance(row, dict) else None
            rows.append({"order": order, "where": where, "subject_id": named if isinstance(named, str) else "",
                         "seeds": [], "problem": str(exc)})
            continue
        rows.append({"order": order, "where": where, "subject_id": subject, "prompt": prompt.prompt,
                     "negative_prompt": prompt.negative_prompt, "guidance_scale": prompt.guidance_scale,
                     "image_guidance_scale": prompt.image_guidance_scale, "seeds": seeds, "problem": None})
    return pa.Table.from_pylist(rows, schema=request_schema())


def _unreadable_row(request: Mapping[str, Any], config: GenerationJobConfig) -> PlanRow:
    """The error row of a plan row that could not be read, keyed by its place and reason (the same bad row
    keeps its key from run to run)."""
    parameters = {"format": GENERATION_FORMAT, "plan_row": request["where"], "problem": request["problem"]}
    key = parameters_key(parameters)
    return PlanRow(plan_index=_row_index(key), subject_id=request["subject_id"], prompt_index=None,
                   prompt=PromptSpec("", "", config.guidance_scale, config.image_guidance_scale), seed=None,
                   cache_uri=None, row_key=key, image_uri=None, parameters=json.dumps(parameters, sort_keys=True),
                   error=request["problem"])


def _explicit_rows(requests: Iterable[Mapping[str, Any]], known: Mapping[str, SubjectSource],
                   config: GenerationJobConfig, wanted: Collection[str] | None) -> Iterator[PlanRow]:
    """Checked requests (every one of their subjects', in plan order) -> plan rows, duplicates dropped. Prompt
    columns are numbered per subject in plan order: a plan file has no global prompt list, and the contact sheet
    draws one subject per sheet."""
    columns: dict[str, dict[PromptSpec, int]] = {}
    seen: set[str] = set()
    for request in requests:
        if request["problem"]:  # reported whatever ``wanted`` says: its subject may be the very thing it got wrong
            yield _unreadable_row(request, config)
            continue
        if wanted is not None and request["subject_id"] not in wanted:
            continue
        subject = _subject_source(request["subject_id"], known, config.caches)
        prompt = PromptSpec(request["prompt"], request["negative_prompt"], request["guidance_scale"],
                            request["image_guidance_scale"])
        numbered = columns.setdefault(subject.subject_id, {})
        index = numbered.setdefault(prompt, len(numbered))
        for seed in request["seeds"]:
            row = plan_row(config, subject, prompt, index, seed)
            if row.row_key not in seen:
                seen.add(row.row_key)
                yield row


def check_plan(config: GenerationJobConfig) -> int | None:
    """An explicit plan's head checked on the driver (see ``plan_file``); its row count when known."""
    if isinstance(config.plan, str):
        return check_plan_file(config.plan, PLAN_KEYS)
    if not config.plan:
        raise InvalidValue(f"the plan {config.plan!r} has no rows")
    return len(config.plan)


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


def plan_row(config: GenerationJobConfig, subject: SubjectSource, prompt: PromptSpec, prompt_index: int,
             seed: int) -> PlanRow:
    """One row, named and keyed (see :func:`image_name`); a subject with an error gets no image URI."""
    parameters = row_parameters(config, subject, prompt, seed)
    key, name = image_name(parameters)
    return PlanRow(
        plan_index=_row_index(key), subject_id=subject.subject_id, prompt_index=prompt_index, prompt=prompt,
        seed=seed, cache_uri=subject.cache_uri, row_key=key,
        image_uri=storage.join_uri(config.out, subject.subject_id, name) if subject.error is None else None,
        parameters=json.dumps(parameters, sort_keys=True), error=subject.error,
    )


def build_plan(config: GenerationJobConfig) -> list[PlanRow]:
    """Every row of the run, in plan order, each with its image URI (or the reason it cannot be rendered), built
    in this process: for tests and small tools (the job builds the same rows in the cluster). Rows with the same
    parameters appear once; a bad row of an explicit plan raises here, where the job makes it an error row."""
    known = load_subjects(config)
    if config.plan is not None:
        check_plan(config)
        requests = [r for table in raw_plan_tables(config.plan) for r in requests_block(table, config).to_pylist()]
        problem = next((r["problem"] for r in requests if r["problem"]), None)
        if problem:
            raise InvalidValue(problem)
        wanted = set(config.subjects) if config.subjects is not None else None
        return list(_explicit_rows(requests, known, config, wanted))
    prompts = load_prompts(config)
    subjects = list(config.subjects) if config.subjects is not None else sorted(known)
    if not subjects:
        raise InvalidValue(f"no subjects: {config.caches} holds no caches")
    rows: list[PlanRow] = []
    seen: set[str] = set()
    for subject_id in dict.fromkeys(subjects):
        subject = _subject_source(subject_id, known, config.caches)
        for index, prompt in enumerate(prompts):
            for seed in config.seeds:
                row = plan_row(config, subject, prompt, index, seed)
                if row.row_key not in seen:
                    seen.add(row.row_key)
                    rows.append(row)
    return rows


# -- the plan as a dataset: subjects x prompts x seeds expanded in the cluster -------------------------------------
SUBJECT_SCHEMA_FIELDS = (("subject_id", "string"), ("cache_uri", "string"), ("cache_version", "string"),
                         ("error", "string"))


def _caching_view():
    """The columns of a caching manifest this job reads (its own view: the caching app owns the full schema)."""
    return pa.schema([("subject_id", pa.string()), ("status", pa.string()), ("cache_uri", pa.string()),
                      ("error", pa.string()), ("source_hashes", pa.list_(pa.string())),
                      ("base_model", pa.string()), ("settings", pa.string())])


def subject_schema():
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in SUBJECT_SCHEMA_FIELDS])


def _subjects_from_caching_rows(batch):
    """A caching manifest's rows (any version of its schema: only these columns are read) -> subject rows."""
    rows = []
    for row in batch.to_pylist():
        hashes = row.get("source_hashes") or []
        made_from = [row.get("base_model") or "", list(hashes), row.get("settings") or ""]
        version = hashlib.sha256(json.dumps(made_from).encode()).hexdigest()[:16] if hashes else ""
        if row.get("status") != "ok" or not row.get("cache_uri"):
            reason = row.get("error") or f"status {row.get('status')!r} without a cache"
            rows.append({"subject_id": row["subject_id"], "cache_uri": None, "cache_version": version,
                         "error": f"caching failed: {reason}"})
        else:
            rows.append({"subject_id": row["subject_id"], "cache_uri": row["cache_uri"], "cache_version": version,
                         "error": None})
    return pa.Table.from_pylist(rows, schema=subject_schema())


def _subjects_from_listing(batch, root: str):
    store = CacheStore(root)
    rows = [{"subject_id": p[: -len(CACHE_SUFFIX)], "cache_uri": store.uri_for(p[: -len(CACHE_SUFFIX)]),
             "cache_version": "", "error": None}
            for p in batch["path"].to_pylist() if p.endswith(CACHE_SUFFIX) and id_problem(p[: -len(CACHE_SUFFIX)]) is None]
    return pa.Table.from_pylist(rows, schema=subject_schema())


def _caching_rows(config: GenerationJobConfig, view):
    """The caching manifest's rows in the columns of ``view`` (those it has) as a dataset: a single
    ``manifest.parquet`` file, or the versioned manifest of a caching job's output prefix; None when the prefix
    holds cache files only."""
    if config.caches.lower().endswith(".parquet"):
        if not storage.exists(config.caches):
            raise storage.ObjectNotFound(f"caching manifest not found: {config.caches}")

        filesystem, path = storage.pyarrow_filesystem(config.caches)
        try:  # the footer alone: a wrong file fails here, in one line, before any task runs
            names = pq.read_schema(path, filesystem=filesystem).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidValue(f"caching manifest {config.caches} is not a readable Parquet file: {exc}") from None
        missing = {"subject_id", "status", "cache_uri"} - set(names)
        if missing:
            raise InvalidValue(f"caching manifest {config.caches} lacks column(s) {sorted(missing)}")
        return read_parquet_files([config.caches], columns=[c for c in view.names if c in names],
                                  split_row_groups=True)
    caching = ManifestLog(config.caches, "caching", view, key="subject_id",
                          legacy_columns=("cache_uri", "source_uris", "status"))
    version = caching.current()
    return caching.dataset(version) if version is not None else None


def subjects_dataset(config: GenerationJobConfig):
    """Every subject the caches know, as a dataset: a caching job's manifest (its output prefix, or a single
    ``manifest.parquet`` file), else the ``<subject_id>.safetensors`` files under the prefix."""
    rows = _caching_rows(config, _caching_view())
    if rows is not None:
        return rows.map_batches(_subjects_from_caching_rows, batch_format="pyarrow")
    return list_prefix(config.caches, recursive=False).map_batches(
        _subjects_from_listing, fn_kwargs={"root": config.caches}, batch_format="pyarrow")


def _first_references(batch, subject_ids: Collection[str]):
    """Rows of ``subject_ids`` that have a reference -> (subject_id, reference_uri: the first source URI)."""
    schema = pa.schema([("subject_id", pa.string()), ("reference_uri", pa.string())])
    if "source_uris" not in batch.column_names:  # a single-file manifest of an older caching job
        return schema.empty_table()
    mine = batch.filter(pc.is_in(batch["subject_id"], value_set=pa.array(list(subject_ids), pa.string())))
    rows = [{"subject_id": r["subject_id"], "reference_uri": r["source_uris"][0]}
            for r in mine.select(["subject_id", "source_uris"]).to_pylist() if r["source_uris"]]
    return pa.Table.from_pylist(rows, schema=schema)


def reference_uris(config: GenerationJobConfig, subject_ids: Collection[str]) -> dict[str, str]:
    """The first reference image URI of each of ``subject_ids`` (the subjects whose contact sheet is drawn, at
    most ``contact_sheet_max_subjects``), from the caching manifest's ``source_uris``: the manifest is filtered
    in the cluster, so the driver sees only these subjects' rows. Empty when the caches have no manifest (or it
    names no sources)."""
    if not subject_ids:
        return {}
    view = pa.schema([("subject_id", pa.string()), ("status", pa.string()), ("cache_uri", pa.string()),
                      ("source_uris", pa.list_(pa.string()))])
    rows = _caching_rows(config, view)
    if rows is None:
        return {}
    found: dict[str, str] = {}
    for row in rows.map_batches(_first_references, fn_kwargs={"subject_ids": sorted(subject_ids)},
                                batch_format="pyarrow").take_all():
        found.setdefault(row["subject_id"], row["reference_uri"])
    return found


def _wanted_block(block, schema):
    """Requested subject ids (``--subjects``) joined with the known ones: unknown ids become error rows."""
    parts = split_sources(block, {"known": schema, "wanted": pa.schema([("subject_id", pa.string())])})
    known = {r["subject_id"]: r for r in parts["known"].to_pylist()}
    rows = [known.get(s) or {"subject_id": s, "cache_uri": None, "cache_version": "", "error": None}
            for s in parts["wanted"]["subject_id"].to_pylist()]
    return pa.Table.from_pylist(rows, schema=schema)


def _wanted(subjects: Sequence[str]):
    """``--subjects`` as a colocate source: (dataset, schema)."""
    ids = ray.data.from_items([{"subject_id": str(s)} for s in dict.fromkeys(subjects)])
    return ids, pa.schema([subject_schema().field("subject_id")])


def _row_index(row_key: str) -> int:
    return int(row_key[:15], 16)  # a batch-local id for the renderer: unique in practice, no global counter


def expand_block(batch, config: GenerationJobConfig, prompts: Sequence[PromptSpec], caches: str):
    """Each subject row -> its rows for every prompt and seed, named and keyed (see :func:`image_name`)."""
    rows = []
    for subject in batch.to_pylist():
        source = SubjectSource(subject["subject_id"], subject["cache_uri"], subject["cache_version"] or "",
                               subject["error"])
        problem = id_problem(source.subject_id)
        if problem is None and source.error is None and source.cache_uri is None:
            problem = f"no cache for subject {source.subject_id!r} in {caches}"
        source = replace(source, error=problem or source.error)
        rows += [plan_row(config, source, prompt, index, seed).result()
                 for index, prompt in enumerate(prompts) for seed in config.seeds]
    return pa.Table.from_pylist(rows, schema=result_schema())


def plan_dataset(config: GenerationJobConfig, prompts: Sequence[PromptSpec]):
    """subjects x prompts x seeds as a dataset of result rows (status null: still to decide)."""
    subjects = subjects_dataset(config)
    if config.subjects is not None:
        schema = subject_schema()
        subjects = colocate({"known": (subjects, schema), "wanted": _wanted(config.subjects)},
                            "subject_id", partitions_for(len(config.subjects))).map_batches(
            _wanted_block, fn_kwargs={"schema": schema}, batch_format="pyarrow", batch_size=None)
    return subjects.map_batches(expand_block, fn_kwargs={"config": config, "prompts": list(prompts),
                                                         "caches": config.caches},
                                batch_format="pyarrow", batch_size=max(1, 20_000 // max(1, len(prompts) * len(config.seeds))))


def explicit_block(block, config: GenerationJobConfig, filtered: bool):
    """One colocated block (the known subjects, the checked plan rows and, when ``filtered``, the wanted subject
    ids, all of the same subjects) -> result rows."""
    schema = subject_schema()
    parts = split_sources(block, {"known": schema, "requests": request_schema(),
                                  "wanted": pa.schema([schema.field("subject_id")])})
    known = {s.subject_id: s for s in _sources(parts["known"].to_pylist(), config.caches)}
    wanted = set(parts["wanted"]["subject_id"].to_pylist()) if filtered else None
    requests = parts["requests"].sort_by("order").to_pylist()
    rows = [row.result() for row in _explicit_rows(requests, known, config, wanted)]
    return pa.Table.from_pylist(rows, schema=result_schema())


def explicit_plan_dataset(config: GenerationJobConfig, rows: int | None):
    """An explicit plan as a dataset of result rows, read, checked and expanded in the cluster: its rows are
    hash-partitioned with the known subjects (and ``--subjects``) by subject id, so each block holds all the rows
    of its subjects. ``rows``: the plan's size when known (it sizes the shuffle)."""
    requests = raw_plan_dataset(config.plan).map_batches(requests_block, fn_kwargs={"config": config},
                                                         batch_format="pyarrow")
    sources = {"known": (subjects_dataset(config), subject_schema()), "requests": (requests, request_schema())}
    if config.subjects is not None:
        sources["wanted"] = _wanted(config.subjects)
    return colocate(sources, "subject_id", partitions_for(rows)).map_batches(
        explicit_block, fn_kwargs={"config": config, "filtered": config.subjects is not None},
        batch_format="pyarrow", batch_size=None)


def _rendered_images(batch):
    """PNGs under the output prefix, outside ``_runs/`` and ``_manifests/``: (image_uri, size)."""
    keep = pc.and_(pc.ends_with(batch["path"], ".png"), pc.invert(pc.starts_with(batch["path"], "_")))
    found = batch.filter(keep)
    return pa.table({"image_uri": found["uri"], "image_bytes": found["size"]})


def _prior_images(batch):
    ok = batch.filter(pc.and_(pc.equal(batch["status"], "ok"), pc.is_valid(batch["image_uri"])))
    return pa.table({"image_uri": ok["image_uri"], "prior_bytes": ok["bytes"]})


def classify_block(block, schema):
    """A row whose image is already in the store (at the size the last manifest recorded, when it did) is
    skipped; the rest is rendered. Errors stay errors."""
    parts = split_sources(block, {
        "plan": schema,
        "found": pa.schema([("image_uri", pa.string()), ("image_bytes", pa.int64())]),
        "prior": pa.schema([("image_uri", pa.string()), ("prior_bytes", pa.int64())]),
    })
    found = dict(zip(parts["found"]["image_uri"].to_pylist(), parts["found"]["image_bytes"].to_pylist()))
    recorded = dict(zip(parts["prior"]["image_uri"].to_pylist(), parts["prior"]["prior_bytes"].to_pylist()))
    rows = parts["plan"].to_pylist()
    for row in rows:
        if row["status"] is not None:
            continue
        size = found.get(row["image_uri"])
        if size and recorded.get(row["image_uri"], size) == size:
            row.update(status="ok", action="skipped", bytes=size)
    return pa.Table.from_pylist(rows, schema=schema)
