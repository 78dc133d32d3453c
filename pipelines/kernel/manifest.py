"""Versioned job manifests: a Parquet dataset per version, published by one small commit object.

Layout under a job's output prefix (one folder per job kind, so the caching and generation jobs never collide):

    _manifests/<kind>/data/<run_id>/part-*.parquet     the rows this run produced (written by the workers)
    _manifests/<kind>/data/<run_id>/kept-*.parquet     rows of earlier runs this run did not touch (merge)
    _manifests/<kind>/_commits/<version>.json          one per published version: its files, counts, run id
    _manifests/<kind>/_latest.json                     a copy of the newest commit, for readers without our code

A version is a complete snapshot: every row of the kind's manifest, one per key (subject, or image row). The
commit object is created only if its version number is still free (a hard link locally, a conditional PUT on
S3), so two runs publishing at once cannot both win: the loser merges again on top of the winner. A reader
follows one commit's file list and sees the old or the new version, never a mix; a killed run commits nothing
and its files are never read. A single-file ``manifest.parquet`` left by an older release is read as the prior
state when its columns fit the kind.

Each run writes a complete snapshot, so old versions pile up: ``dreamcache vacuum OUT`` (:meth:`ManifestLog.vacuum`)
deletes the versions no reader or running job can still need, and the files only they name.

Without this project's code (pyarrow, duckdb):

    pq.read_table(json.load(open("OUT/_manifests/caching/_latest.json"))["files"])
    duckdb: SET VARIABLE f = (SELECT files FROM read_json('OUT/_manifests/caching/_latest.json'));
            SELECT status, action, count(*) FROM read_parquet(getvariable('f')) GROUP BY ALL;
"""

from __future__ import annotations

import calendar
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from dreamcache import storage
from dreamcache.errors import DreamCacheError, InvalidValue

from .listing import read_parquet_files

logger = logging.getLogger(__name__)

MANIFESTS_DIR = "_manifests"
LEGACY_NAME = "manifest.parquet"
FORMAT = "dreamcache-manifest-1"


class ManifestError(DreamCacheError):
    """A manifest exists but cannot be read; the message names the object and what to do."""

    kind = "unreadable"


class CommitConflict(Exception):
    """Another run published the version this run meant to publish."""


@dataclass(frozen=True)
class ManifestVersion:
    kind: str
    version: int  # 0: a legacy single-file manifest
    run_id: str
    files: tuple[str, ...]
    rows: int
    created: str = ""
    parent: int | None = None
    counts: Mapping[str, int] = field(default_factory=dict)  # this run's rows by status/action
    uri: str = ""  # the commit object (or the legacy file)

    def commit_json(self) -> str:
        body = {"format": FORMAT, **asdict(self), "files": list(self.files), "counts": dict(self.counts)}
        body.pop("uri")
        return json.dumps(body, indent=1, sort_keys=True)


@dataclass(frozen=True)
class VacuumReport:
    """What :meth:`ManifestLog.vacuum` removed (or, on a dry run, would remove) and kept."""

    kind: str
    kept_versions: tuple[int, ...]
    removed_versions: tuple[int, ...]
    removed_files: int
    removed_bytes: int
    young_unpublished: int  # files no version names, written within the retention: a run may still be writing
    dry_run: bool

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        kept = f"{len(self.kept_versions)} versions kept ({_span(self.kept_versions)})"
        young = (f"; {self.young_unpublished} files of unpublished runs are younger than the retention, kept"
                 if self.young_unpublished else "")
        return (f"{self.kind} manifest: {kept}; {verb} {len(self.removed_versions)} versions and "
                f"{self.removed_files} files ({self.removed_bytes / 2**20:.1f} MiB){young}")


def _span(versions: tuple[int, ...]) -> str:
    return "none" if not versions else f"{versions[0]}" if len(versions) == 1 else f"{versions[0]}-{versions[-1]}"


def _epoch(created: str) -> float:
    """A commit's ``created`` in epoch seconds; a commit without one counts as new (kept)."""
    return float(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))) if created else float("inf")


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows of an older version (or a legacy file) in today's schema: missing columns null, extra ones dropped."""
    columns = [batch[name].cast(f.type) if name in batch.column_names else pa.nulls(batch.num_rows, f.type)
               for name, f in zip(schema.names, schema)]
    return pa.Table.from_arrays(columns, schema=schema)


class ManifestLog:
    """The versions of one job kind's manifest under ``out``."""

    def __init__(self, out: str, kind: str, schema: pa.Schema, key: str, legacy_columns: Iterable[str] = ()) -> None:
        storage.validate_id(kind, "manifest kind")
        self.out, self.kind, self.schema, self.key = out, kind, schema, key
        self.legacy_columns = frozenset(legacy_columns) | {key}
        self.root = storage.join_uri(out, MANIFESTS_DIR, kind)
        self.commits = storage.join_uri(self.root, "_commits")
        self.latest_uri = storage.join_uri(self.root, "_latest.json")
        self.legacy_uri = storage.join_uri(out, LEGACY_NAME)

    def data_prefix(self, run_id: str) -> str:
        return storage.join_uri(self.root, "data", storage.validate_id(run_id, "run id"))

    def commit_uri(self, version: int) -> str:
        return storage.join_uri(self.commits, f"{version:012d}.json")

    # -- reading ---------------------------------------------------------------------------------------------
    def current(self) -> ManifestVersion | None:
        """The newest published version, a legacy single file as version 0, or None."""
        names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(self.commits)]
        versions = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        if versions:
            return self.read_commit(self.commit_uri(versions[-1]))
        return self._legacy()

    def read_commit(self, uri: str) -> ManifestVersion:
        what = (f"to rebuild from the store, move {self.commits} aside (every cache is then checked against "
                f"its header once)")
        try:
            body = json.loads(storage.read_bytes(uri))
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} commit")
            return ManifestVersion(
                kind=body["kind"], version=int(body["version"]), run_id=str(body["run_id"]),
                files=tuple(body["files"]), rows=int(body["rows"]), created=str(body.get("created", "")),
                parent=body.get("parent"), counts=dict(body.get("counts") or {}), uri=uri,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"manifest commit {uri} cannot be read ({exc}); {what}") from None

    def _legacy(self) -> ManifestVersion | None:
        try:
            data = storage.read_bytes(self.legacy_uri)
        except storage.ObjectNotFound:
            return None
        try:
            meta = pq.read_metadata(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"{self.legacy_uri} is not a Parquet manifest ({exc}); move it aside or delete it "
                                f"to start from the store") from None
        # The Arrow schema's top-level names: the Parquet schema's names are its leaves ("element" for a list).
        names = set(meta.schema.to_arrow_schema().names)
        if not self.legacy_columns <= names:
            logger.info("ignoring %s: a manifest of another job kind (no %s columns)", self.legacy_uri,
                        sorted(self.legacy_columns - names))
            return None
        return ManifestVersion(self.kind, 0, "legacy", (self.legacy_uri,), meta.num_rows, uri=self.legacy_uri)

    def dataset(self, version: ManifestVersion, columns: list[str] | None = None):
        """A version's rows as a Ray dataset in today's schema (older versions conformed)."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        if not version.files:  # a version of no rows (a run over an empty input)
            import ray

            return ray.data.from_arrow(schema.empty_table())
        missing = [f for f in version.files[:1] if not storage.exists(f)]
        if missing:
            raise ManifestError(f"manifest version {version.version} ({version.uri}) names {missing[0]}, which is "
                                f"gone; move {self.commits} aside to rebuild from the store")
        return read_parquet_files(list(version.files)).map_batches(
            conform, fn_kwargs={"schema": schema}, batch_format="pyarrow", batch_size=None)

    def iter_batches(self, version: ManifestVersion) -> Iterable[pa.RecordBatch]:
        """A version's rows in batches, without Ray (the ``dreamcache manifest`` command)."""
        import pyarrow.dataset as pads

        filesystem, _ = storage.pyarrow_filesystem(version.files[0])
        paths = [storage.pyarrow_filesystem(f)[1] for f in version.files]
        try:
            for batch in pads.dataset(paths, filesystem=filesystem, format="parquet").to_batches():
                yield from conform(pa.Table.from_batches([batch]), self.schema).to_batches()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"manifest version {version.version} ({version.uri}) cannot be read: {exc}") from None

    # -- publishing ------------------------------------------------------------------------------------------
    def commit(self, run_id: str, files: list[str], rows: int, counts: Mapping[str, int],
               parent: ManifestVersion | None) -> ManifestVersion:
        """Publish ``files`` as the version after ``parent``; CommitConflict if another run took it first."""
        number = (parent.version if parent else 0) + 1
        version = ManifestVersion(
            kind=self.kind, version=number, run_id=run_id, files=tuple(files), rows=rows,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            parent=parent.version if parent else None, counts=dict(counts), uri=self.commit_uri(number),
        )
        try:
            storage.write_bytes_if_absent(version.uri, version.commit_json().encode())
        except storage.AlreadyExists:
            raise CommitConflict(f"version {number} of {self.root} was published by another run") from None
        storage.write_bytes(self.latest_uri, version.commit_json().encode())  # a convenience copy; the commit rules
        logger.info("published %s manifest version %d (%d rows, %d files): %s", self.kind, number, rows,
                    len(files), version.uri)
        return version


    # -- housekeeping ----------------------------------------------------------------------------------------
    def vacuum(self, keep_versions: int = 5, retain_s: float = 7 * 86400, dry_run: bool = False,
               now: float | None = None) -> VacuumReport:
        """Delete old versions and the data files that only they, or no version at all, name.

        Kept: the newest ``keep_versions`` versions, and every version that was the newest one at some time
        within ``retain_s`` seconds, since a job that started then plans against it and reads it again when it
        publishes; and every file no version names that was written within ``retain_s`` (a running job's, not
        yet published). Removed: the other versions' commits, then their files, and older unpublished files (a
        killed run's). Caches, images and a legacy ``manifest.parquet`` are never touched."""
        if keep_versions < 1:
            raise InvalidValue(f"keep_versions must be at least 1 (the current version), not {keep_versions}")
        if retain_s < 0:
            raise InvalidValue(f"the retention must not be negative, not {retain_s} s")
        now = time.time() if now is None else now
        names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(self.commits)]
        numbers = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        versions = [self.read_commit(self.commit_uri(n)) for n in numbers]  # an unreadable one stops the vacuum
        cutoff = now - retain_s
        keep = {v.version for v in versions[-keep_versions:]}
        for older, newer in zip(versions, versions[1:]):
            if _epoch(newer.created) >= cutoff:  # ``older`` was the newest one until less than retain_s ago
                keep.add(older.version)
        kept = [v for v in versions if v.version in keep]
        removed = [v for v in versions if v.version not in keep]
        named_by_kept = {f for v in kept for f in v.files}
        named_by_removed = {f for v in removed for f in v.files} - named_by_kept
        doomed: list[storage.ObjectInfo] = []
        young = 0
        # One listing for the sizes; a stat (its age) only for a file no version names.
        for info in storage.list_objects(storage.join_uri(self.root, "data")):
            if info.uri in named_by_kept:
                continue
            if info.uri in named_by_removed or (storage.stat(info.uri).modified or now) < cutoff:
                doomed.append(info)
            else:
                young += 1
        if not dry_run:
            # Commits first: a vacuum stopped half-way leaves files no version names, which the next one removes.
            for version in removed:
                storage.delete(version.uri)
            for info in doomed:
                storage.delete(info.uri)
            logger.info("vacuumed %s: %d versions, %d files", self.root, len(removed), len(doomed))
        return VacuumReport(self.kind, tuple(sorted(keep)), tuple(v.version for v in removed), len(doomed),
                            sum(i.size for i in doomed), young, dry_run)


def find_manifests(uri: str, kinds: Iterable[str]) -> list[tuple[str, str]]:
    """(kind, output prefix) of the manifests ``uri`` names: an output prefix, a ``_manifests/<kind>`` folder,
    or a legacy ``manifest.parquet`` file (kind ""), for the ``dreamcache manifest`` command."""
    loc = storage.parse_uri(uri)
    if loc.path.rstrip("/").endswith(".parquet"):
        return [("", uri)]
    parts = loc.path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == MANIFESTS_DIR:
        return [(parts[-1], uri.rstrip("/").rsplit("/", 2)[0])]
    found = [(kind, uri) for kind in kinds if storage.list_files(storage.join_uri(uri, MANIFESTS_DIR, kind, "_commits"))]
    if not found and storage.exists(storage.join_uri(uri, LEGACY_NAME)):
        found = [("", storage.join_uri(uri, LEGACY_NAME))]
    return found
