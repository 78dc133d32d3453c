"""The manifest of a generation run: the output layout's names, the Arrow schemas of plan records, results
and manifest rows, and whole-object Parquet reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dreamcache import storage

MANIFEST_NAME = "manifest.parquet"
RUNS_DIR = "_runs"  # starts with "_": never a valid subject id, so it cannot collide with a subject folder


def result_row(row: Mapping, status: str, action: str, error: str | None = None, **timings) -> dict:
    """A plan record with its outcome; rows that are not ``ok`` have no image."""
    result = {**row, "status": status, "action": action, "error": error, "bytes": None, "cache_read_s": 0.0,
              "generate_s": 0.0, "write_s": 0.0, "started_at": None, "finished_at": None}
    result.update(timings)
    if status != "ok":
        result["image_uri"] = None
    return result


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

    storage.write_parquet(uri, pa.Table.from_pylist(list(rows), schema=schema))


def read_manifest(uri: str) -> list[dict]:
    return storage.read_parquet(uri).to_pylist()
