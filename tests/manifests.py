"""Reading a job's manifest the way a user without this project's code would: the newest commit's file list
(``_manifests/<kind>/_latest.json``), then plain pyarrow."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from dreamcache import storage


def latest_commit(out: str, kind: str) -> dict:
    return json.loads(storage.read_bytes(storage.join_uri(out, "_manifests", kind, "_latest.json")))


def manifest_table(out: str, kind: str) -> pa.Table:
    files = latest_commit(out, kind)["files"]
    return pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f))) for f in files])


def manifest_rows(out: str, kind: str = "caching", key: str = "subject_id") -> dict[str, dict]:
    rows = manifest_table(out, kind).to_pylist()
    assert len(rows) == len({r[key] for r in rows}), "duplicate manifest rows"
    return {r[key]: r for r in rows}
