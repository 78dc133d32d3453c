"""The caching plan as a dataset: references -> one work row per subject, joined with the last manifest and the
store's listing, each row either finished (an error, or unchanged and skipped) or to compute.

    references    a prefix listed in parallel (PREFIX/<subject_id>/<images>) or a catalog file read by Ray Data
    versions      catalog rows without a version get one HEAD each, in parallel (no body read)
    colocate      references, the last manifest's rows and the store's cache files hash-partitioned together by
                  subject id (one shuffle): each block groups its references into subjects and looks up their
                  last row and stored cache locally
    classify      ids validated, limits checked, unchanged subjects skipped (a cache missing from the store or of
                  another size than the manifest says is recomputed)

Nothing here runs on the driver but the set-up: a plan of 10M subjects never exists in one process.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dreamcache import storage
from dreamcache.cache_store import CACHE_SUFFIX, CacheStore

from ..kernel.listing import list_prefix, read_parquet_files, read_text_table
from ..kernel.run import Tally, colocate, partitions_for, split_sources
from .config import CachingJobConfig, JobInputError

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
    ("cache_bytes", pa.binary()),  # the cache file (compute -> write)
    ("stored_cache", pa.string()),  # JSON of a cache already in the store: its size (plan), then its base model
                                    # if it was made from these sources and settings (read -> compute)
    ("seen_before", pa.bool_()),  # the last manifest has this subject (when all have, nothing is left to keep)
])
REF_SCHEMA = pa.schema([
    ("subject_id", pa.string()),
    ("image_uri", pa.string()),  # null: not a reference (a hidden file, an empty folder), but the subject exists
    ("image_version", pa.string()),
    ("problem", pa.string()),  # why this reference makes its subject an error row
    ("retryable", pa.bool_()),  # the problem may pass (a storage failure), unlike bad input
])
PRIOR = "prior."  # the last manifest's columns, renamed so they sit beside the plan's in one block
PRIOR_SCHEMA = pa.schema([pa.field("subject_id", pa.string())] +
                         [pa.field(PRIOR + f.name, f.type) for f in MANIFEST_SCHEMA if f.name != "subject_id"])
STORED_SCHEMA = pa.schema([("subject_id", pa.string()), ("stored_bytes", pa.int64())])
LEGACY_COLUMNS = ("cache_uri", "source_uris", "status")
CATALOG_VERSION_COLUMNS = ("image_version", "etag")  # optional: e.g. from an S3 inventory report, saves a HEAD each


# -- references ------------------------------------------------------------------------------------------------
def _references_from_listing(batch: pa.Table) -> pa.Table:
    subjects, uris, versions, problems = [], [], [], []
    for path, uri, version in zip(batch["path"].to_pylist(), batch["uri"].to_pylist(), batch["version"].to_pylist()):
        parts = path.rstrip("/").split("/")
        name = parts[-1]
        if len(parts) == 1 and not path.endswith("/"):  # a file beside the subject folders
            if name.startswith("."):
                continue
            subjects.append(name), uris.append(None), versions.append(None)
            problems.append(f"{uri} is not inside a <subject_id>/ folder")
            continue
        # Hidden files (.DS_Store, editor droppings) and empty folders or S3 folder markers are not references,
        # but they still name a subject, which then gets its row ("no images").
        reference = not path.endswith("/") and not name.startswith(".")
        subjects.append(parts[0]), uris.append(uri if reference else None)
        versions.append(version if reference else None), problems.append(None)
    return pa.table({"subject_id": subjects, "image_uri": uris, "image_version": versions, "problem": problems,
                     "retryable": [False] * len(subjects)}, schema=REF_SCHEMA)


def _references_from_catalog(batch: pa.Table) -> pa.Table:
    ids = ["" if v is None else str(v) for v in batch["subject_id"].to_pylist()]
    uris = batch["image_uri"].cast(pa.string()).to_pylist()
    version_column = next((c for c in CATALOG_VERSION_COLUMNS if c in batch.column_names), None)
    versions = batch[version_column].cast(pa.string()).to_pylist() if version_column else [None] * len(ids)
    problems = []
    for i, uri in enumerate(uris):
        problem = None
        if not uri:
            problem = "a catalog row has no image_uri"
        else:
            try:
                storage.parse_uri(uri)
            except storage.InvalidURI as exc:  # http://, s3:// without a bucket: this subject's error, not the job's
                problem = f"image_uri {uri!r}: {exc}"
        problems.append(problem)
        if problem:
            uris[i] = None
    return pa.table({"subject_id": ids, "image_uri": uris, "image_version": versions, "problem": problems,
                     "retryable": [False] * len(ids)}, schema=REF_SCHEMA)


CATALOG_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


def _check_catalog(uri: str) -> None:
    """The catalog's columns, from its footer (Parquet) or first rows: a wrong file fails in one line, at once."""
    suffix = PurePosixPath(storage.parse_uri(uri).path).suffix.lower()
    if suffix not in CATALOG_FORMATS:
        raise JobInputError(f"catalog {uri}: unknown format {suffix!r} (use .parquet, .csv or .jsonl)")
    if not storage.exists(uri):
        raise JobInputError(f"catalog not found: {uri}")
    try:
        if suffix == ".parquet":
            filesystem, path = storage.pyarrow_filesystem(uri)
            names = pq.read_schema(path, filesystem=filesystem).names
        else:
            head = storage.read_range(uri, 0, 1 << 20)
            head = head[: head.rfind(b"\n") + 1] or head
            reader = pacsv.read_csv if suffix == ".csv" else pajson.read_json
            names = reader(pa.BufferReader(head)).column_names
    except (pa.ArrowInvalid, OSError) as exc:
        raise JobInputError(f"catalog {uri} cannot be parsed: {exc}") from None
    missing = {"subject_id", "image_uri"} - set(names)
    if missing:
        raise JobInputError(f"catalog {uri} lacks columns {sorted(missing)}")


def _catalog_references(uri: str, read_cpus: float):
    _check_catalog(uri)
    kind = CATALOG_FORMATS[PurePosixPath(storage.parse_uri(uri).path).suffix.lower()]
    rows = read_parquet_files([uri], split_row_groups=True) if kind == "parquet" else read_text_table(uri, kind)
    return rows.map_batches(_references_from_catalog, batch_format="pyarrow", num_cpus=read_cpus)


def _with_versions(batch: pa.Table) -> pa.Table:
    """Each reference without a version gets one from a HEAD; a missing or unreadable one is its problem."""
    from .stages import retryable

    versions, problems = batch["image_version"].to_pylist(), batch["problem"].to_pylist()
    again = batch["retryable"].to_pylist()
    for i, uri in enumerate(batch["image_uri"].to_pylist()):
        if uri is None or versions[i] or problems[i]:
            continue
        try:
            versions[i] = storage.stat(uri).version
        except storage.StorageError as exc:
            problems[i], again[i] = str(exc), retryable(exc)
    return batch.set_column(2, "image_version", pa.array(versions, pa.string())).set_column(
        3, "problem", pa.array(problems, pa.string())).set_column(4, "retryable", pa.array(again, pa.bool_()))


def _stored_caches(batch: pa.Table) -> pa.Table:
    names = [p[: -len(CACHE_SUFFIX)] if p.endswith(CACHE_SUFFIX) else None for p in batch["path"].to_pylist()]
    table = pa.table({"subject_id": names, "stored_bytes": batch["size"]}, schema=STORED_SCHEMA)
    return table.filter(pc.is_valid(table["subject_id"]))


def _prior_rows(batch: pa.Table) -> pa.Table:
    return pa.Table.from_arrays(
        [batch["subject_id"]] + [batch[f.name[len(PRIOR):]] for f in PRIOR_SCHEMA if f.name != "subject_id"],
        schema=PRIOR_SCHEMA)


# -- one block of colocated rows -> work rows --------------------------------------------------------------------
def _empty_row(subject_id: str, run_id: str) -> dict:
    row = {f.name: None for f in WORK_SCHEMA}
    row.update(subject_id=subject_id, status="ok", run_id=run_id, source_uris=[], source_hashes=[],
               source_versions=[], pixels=[], bytes=0, num_references=0, read_s=0.0, compute_s=0.0, write_s=0.0)
    return row


def fail(row: dict, reason: str, retryable: bool) -> None:
    row.update(status="error", error=reason, retryable=retryable, action="failed", cache_uri=None, pixels=[],
               cache_bytes=None)


def _unchanged(row: dict, prior: dict | None, stored_bytes: int | None) -> bool:
    """Same sources (by version), same model files, same settings, and the last run made this cache, which is
    still in the store at the size it wrote (or found these very inputs bad: a corrupt image stays corrupt until
    it is replaced)."""
    if not prior:
        return False
    if prior.get("status") == "ok":
        finished = stored_bytes is not None and stored_bytes == prior.get("bytes")
    else:
        finished = prior.get("retryable") is False
    return bool(
        finished and prior.get("source_uris") == row["source_uris"]
        and prior.get("source_versions") == row["source_versions"] and all(row["source_versions"])
        and prior.get("model_version") == row["model_version"] and prior.get("settings") == row["settings"]
    )


def plan_block(block: pa.Table, config: CachingJobConfig, model_version: str,
               tally: Tally | None = None) -> pa.Table:
    """Group one block's references into subjects, attach their last row and stored cache, classify; the
    block's counts (rows, to compute, seen before) go to ``tally``."""
    parts = split_sources(block, {"refs": REF_SCHEMA, "prior": PRIOR_SCHEMA, "stored": STORED_SCHEMA})
    prior = {r["subject_id"]: {k[len(PRIOR):]: v for k, v in r.items() if k != "subject_id"}
             for r in parts["prior"].to_pylist()}
    stored = dict(zip(parts["stored"]["subject_id"].to_pylist(), parts["stored"]["stored_bytes"].to_pylist()))
    refs = parts["refs"].sort_by([("subject_id", "ascending"), ("image_uri", "ascending")])
    grouped = refs.group_by("subject_id", use_threads=False).aggregate(
        [("image_uri", "list"), ("image_version", "list"), ("problem", "list"), ("retryable", "list")])
    store = CacheStore(config.out)
    settings = config.settings()
    rows = []
    for subject_id, uris, versions, problems, again in zip(
            grouped["subject_id"].to_pylist(), grouped["image_uri_list"].to_pylist(),
            grouped["image_version_list"].to_pylist(), grouped["problem_list"].to_pylist(),
            grouped["retryable_list"].to_pylist()):
        row = _empty_row(subject_id, config.run_id)
        kept = [(u, v or "") for u, v in zip(uris, versions) if u is not None]
        row.update(source_uris=[u for u, _ in kept], source_versions=[v for _, v in kept],
                   model_version=model_version, settings=settings, num_references=len(kept))
        problem, retry = next(((p, bool(r)) for p, r in zip(problems, again) if p), (None, False))
        try:
            storage.validate_id(subject_id)
            row["cache_uri"] = store.uri_for(subject_id)
        except storage.InvalidId as exc:
            problem, retry = problem or str(exc), retry and problem is not None
        if problem is None and not kept:
            problem = "no images"
        if problem is None and len(kept) > config.max_references:
            problem = f"{len(kept)} images exceed the limit of {config.max_references} references"
        if problem is not None:
            fail(row, problem, retryable=retry)
        last, size = prior.get(subject_id), stored.get(subject_id)
        row["seen_before"] = last is not None
        if row["status"] == "ok" and _unchanged(row, last, size):
            row.update(action="skipped", source_hashes=last["source_hashes"], base_model=last["base_model"],
                       bytes=last["bytes"], status=last["status"], error=last["error"],
                       retryable=last["retryable"], cache_uri=last["cache_uri"])
        elif row["status"] == "ok" and size is not None:  # a cache from a run that published nothing, maybe
            row["stored_cache"] = f'{{"bytes": {int(size)}}}'
        rows.append(row)
    if tally is not None:
        part = min((r["subject_id"] for r in rows), default="")  # partitions hold distinct subjects
        tally.put(part, {"rows": len(rows), "todo": sum(r["action"] is None for r in rows),
                         "seen": sum(r["seen_before"] for r in rows)})
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def plan(config: CachingJobConfig, prior_ds, model_version: str, tally: Tally | None = None):
    """The classified plan as a Ray dataset of WORK_SCHEMA rows, one per input subject."""
    if config.images:
        refs = list_prefix(config.images, shards=config.listing_shards, num_cpus=config.read_cpus).map_batches(
            _references_from_listing, batch_format="pyarrow", num_cpus=config.read_cpus)
        size = None
    else:
        refs = _catalog_references(config.catalog, config.read_cpus).map_batches(
            _with_versions, batch_format="pyarrow", num_cpus=config.read_cpus)
        size = _catalog_rows(config.catalog)
    stored = list_prefix(config.out, recursive=False, shards=config.listing_shards,
                         num_cpus=config.read_cpus).map_batches(_stored_caches, batch_format="pyarrow")
    sources = {"refs": (refs, REF_SCHEMA), "stored": (stored, STORED_SCHEMA)}
    if prior_ds is not None:
        sources["prior"] = (prior_ds.map_batches(_prior_rows, batch_format="pyarrow"), PRIOR_SCHEMA)
    colocated = colocate(sources, "subject_id", partitions_for(size))
    return colocated.map_batches(plan_block, fn_kwargs={"config": config, "model_version": model_version,
                                                        "tally": tally},
                                 batch_format="pyarrow", batch_size=None, num_cpus=config.read_cpus)


def _catalog_rows(uri: str) -> int | None:
    """A Parquet catalog's row count from its footer (sizes the shuffle); None for text formats."""
    if not uri.lower().endswith(".parquet"):
        return None
    filesystem, path = storage.pyarrow_filesystem(uri)
    with filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows
