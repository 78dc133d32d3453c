"""The manifest of a generation run: the output layout's names, the Arrow schemas of plan records, results
and manifest rows, and whole-object Parquet reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from dreamcache import storage

from ..kernel.manifest import ManifestLog

KIND = "generation"  # the manifest's folder: <out>/_manifests/generation/
MANIFEST_NAME = "manifest.parquet"  # an older release's single-file manifest (read as the prior state)
RUNS_DIR = "_runs"  # starts with "_": never a valid subject id, so it cannot collide with a subject folder
LEGACY_COLUMNS = ("row_key", "image_uri", "status")


def result_row(row: Mapping, status: str, action: str, error: str | None = None, **timings) -> dict:
    """A plan record with its outcome (``status`` None: not decided yet); error rows have no image."""
    result = {**row, "status": status, "action": action, "error": error, "bytes": None, "cache_read_s": 0.0,
              "generate_s": 0.0, "write_s": 0.0, "started_at": None, "finished_at": None}
    result.update(timings)
    if status == "error":
        result["image_uri"] = None
    return result


def plan_schema():
    return pa.schema([
        ("plan_index", pa.int64()), ("row_key", pa.string()), ("subject_id", pa.string()),
        ("prompt_index", pa.int32()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
        ("seed", pa.int64()), ("guidance_scale", pa.float64()), ("image_guidance_scale", pa.float64()),
        ("parameters", pa.string()), ("cache_uri", pa.string()), ("image_uri", pa.string()),
    ])


def result_schema():
    return pa.schema(list(plan_schema()) + [
        ("status", pa.string()), ("action", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
        ("cache_read_s", pa.float64()), ("generate_s", pa.float64()), ("write_s", pa.float64()),
        ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ])


def manifest_schema():
    """One row per plan row: what was asked (subject, prompt, seed, parameters), what happened (status
    ok/error, action rendered/skipped/failed, error), where the image is, and timings."""
    return pa.schema(list(result_schema()) + [
        ("guidance", pa.string()), ("steps", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
        ("run_id", pa.string()),
    ])


def manifest_log(out: str):
    return ManifestLog(out, KIND, manifest_schema(), key="row_key", legacy_columns=LEGACY_COLUMNS)


def read_manifest(uri: str) -> list[dict]:
    """Rows of a published version (its commit object, ``.json``), of one run (its data folder: the rows that
    run produced), or of a single Parquet file. For tests and small tools: the rows come back as a list."""
    if uri.endswith(".json"):
        files = list(manifest_log(uri.rsplit("/_manifests/", 1)[0]).read_commit(uri).files)
    elif uri.endswith(".parquet"):
        files = [uri]
    else:
        files = [f for f in storage.list_files(uri) if f.rsplit("/", 1)[-1].startswith("part-")]
    tables = [storage.read_parquet(f) for f in files]
    return pa.concat_tables(tables).to_pylist() if tables else []
