"""``dreamcache manifest URI``: counts by status and action and the error rows of every manifest a URI names,
streamed in batches (a manifest of millions of rows is never held whole); ``dreamcache vacuum URI``: old versions
of those manifests removed."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from dreamcache import storage
from dreamcache.errors import DreamCacheError

from .kernel.manifest import ManifestLog, ManifestVersion, find_manifests

KINDS = ("caching", "generation")


def _log(kind: str, out: str) -> ManifestLog:
    """The kind's log with its own schema (imported here: each app owns its manifest's columns)."""
    if kind == "caching":
        from pipelines.caching.job import manifest_log

        return manifest_log(out)
    from pipelines.generation.manifest import manifest_log

    return manifest_log(out)


def _batches(kind: str, where: str):
    if not kind:  # a single-file manifest.parquet: any columns
        table = pq.read_table(pa.BufferReader(storage.read_bytes(where)))
        yield where, table.num_rows, iter(table.to_batches())
        return
    log = _log(kind, where)
    version: ManifestVersion | None = log.current()
    if version is None:
        raise DreamCacheError(f"no {kind} manifest under {where}", kind="not_found")
    yield f"{kind} manifest version {version.version} ({version.uri})", version.rows, log.iter_batches(version)


def print_manifests(uri: str, as_json: bool = False, max_errors: int = 20) -> None:
    found = find_manifests(uri, KINDS)
    if not found:
        raise DreamCacheError(f"no manifest under {uri} (expected _manifests/<kind>/ or manifest.parquet)",
                              kind="not_found")
    for kind, where in found:
        for title, rows, batches in _batches(kind, where):
            counts: Counter = Counter()
            errors: list[dict] = []
            for batch in batches:
                if as_json:
                    for row in batch.to_pylist():
                        print(json.dumps(row, default=str))
                    continue
                for row in batch.to_pylist():
                    counts[("status", row.get("status"))] += 1
                    counts[("action", row.get("action"))] += 1
                    if row.get("status") == "error" and len(errors) < max_errors:
                        errors.append(row)
            if as_json:
                continue
            print(f"{title}: {rows:,} rows")
            for column in ("status", "action"):
                parts = [f"{value} {n:,}" for (c, value), n in sorted(counts.items(), key=str) if c == column]
                print(f"  {column}: " + ", ".join(parts))
            for row in errors:
                name = row.get("subject_id") or row.get("row_key")
                print(f"  error {name}: {row.get('error')}")
            shown = counts[("status", "error")]
            if shown > len(errors):
                print(f"  ... {shown - len(errors):,} more error rows (--json prints every row)")
    sys.stdout.flush()


def vacuum_manifests(uri: str, keep_versions: int, retain_hours: float, dry_run: bool) -> list[str]:
    """One line per manifest ``uri`` names: what :meth:`ManifestLog.vacuum` removed and kept."""
    found = find_manifests(uri, KINDS)
    if not found:
        raise DreamCacheError(f"no manifest under {uri} (expected _manifests/<kind>/ or manifest.parquet)",
                              kind="not_found")
    lines = []
    for kind, where in found:
        if not kind:
            lines.append(f"{where}: a single-file manifest of an older release, nothing to vacuum")
            continue
        report = _log(kind, where).vacuum(keep_versions, retain_hours * 3600, dry_run)
        lines.append(report.line())
    return lines
