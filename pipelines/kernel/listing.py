"""A prefix listed by many Ray tasks at once, as a dataset of (path, uri, size, version) rows.

S3 is split into key ranges (ListObjectsV2 from ``StartAfter`` to an upper bound), a local folder into hash
shards of its top-level entries (``dreamcache.storage.iter_listing_shard``). Each task streams its rows in
blocks, so no process ever holds the whole listing; the driver only hands out the shard bounds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dreamcache import storage

LISTING_SCHEMA = pa.schema([
    ("path", pa.string()),  # relative to the prefix, "/"-separated; an empty folder ends in "/"
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("version", pa.string()),  # ETag, or size-mtime locally
])
ROWS_PER_BLOCK = 20_000


def _list_shards(batch: pa.Table, prefix: str, shards: int, recursive: bool) -> Iterator[pa.Table]:
    bounds = storage.listing_shards(prefix, shards) if storage.is_s3(prefix) else [(None, None)] * shards
    for index in batch["shard"].to_pylist():
        rows: list[tuple[str, int, str]] = []
        sent = False
        for entry in storage.iter_listing_shard(prefix, bounds[index], index, shards, recursive=recursive):
            rows.append(entry)
            if len(rows) >= ROWS_PER_BLOCK:
                yield _block(prefix, rows)
                rows, sent = [], True
        if rows or not sent:
            # An empty shard still yields a typed (empty) block rather than none.
            yield _block(prefix, rows)


def _block(prefix: str, rows: list[tuple[str, int, str]]) -> pa.Table:
    paths = [r[0] for r in rows]
    base = prefix.rstrip("/") + "/"
    return pa.table({"path": paths, "uri": [base + p for p in paths], "size": [r[1] for r in rows],
                     "version": [r[2] for r in rows]}, schema=LISTING_SCHEMA)


def list_prefix(prefix: str, *, recursive: bool = True, shards: int | None = None, num_cpus: float = 0.25):
    """Every file under ``prefix`` (recursive) or directly in it, as a Ray dataset of :data:`LISTING_SCHEMA`.

    ``shards`` defaults to 16 for S3 (key ranges: one LIST page per 1,000 keys each) and 4 locally (each shard
    scans the top-level names once, then walks only its own entries)."""
    import ray

    storage.parse_uri(prefix)  # a bad URI fails here, in the driver, as the job's input error
    if shards is None:
        shards = 16 if storage.is_s3(prefix) else 4
    return ray.data.from_items([{"shard": i} for i in range(shards)], override_num_blocks=shards).map_batches(
        _list_shards, fn_kwargs={"prefix": prefix, "shards": shards, "recursive": recursive},
        batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
    )


# -- files we already know -------------------------------------------------------------------------------------------
# Ray's read_parquet first lists and inspects its paths in one task (tens of seconds on a busy 2-core node for two
# files); a manifest's commit already names its files, and a catalog is one file: these readers go straight to
# the data, one task per file (Parquet: per group of row groups), streaming record batches.
def _read_pieces(batch: pa.Table, columns: list[str] | None) -> Iterator[pa.Table]:
    for uri, groups in zip(batch["uri"].to_pylist(), batch["row_groups"].to_pylist()):
        filesystem, path = storage.pyarrow_filesystem(uri)
        with filesystem.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle)
            for group in groups if groups is not None else range(reader.num_row_groups):
                yield reader.read_row_group(group, columns=columns)
            if groups is None and reader.num_row_groups == 0:
                yield reader.schema_arrow.empty_table() if columns is None else \
                    reader.schema_arrow.empty_table().select(columns)


def row_groups(uri: str) -> list[tuple[int, int]]:
    """(row group, number of its first row) of one Parquet file, from its footer."""
    filesystem, path = storage.pyarrow_filesystem(uri)
    with filesystem.open_input_file(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
    groups, first = [], 0
    for group in range(metadata.num_row_groups):
        groups.append((group, first))
        first += metadata.row_group(group).num_rows
    return groups


def read_parquet_files(uris: list[str], columns: list[str] | None = None, num_cpus: float = 0.5,
                       split_row_groups: bool = False):
    """Parquet files as a Ray dataset, one read task per file (``split_row_groups``: per row group, so one big
    catalog file is read in parallel)."""
    import ray

    pieces = []
    for uri in uris:
        groups = [group for group, _ in row_groups(uri)] if split_row_groups else None
        if groups:
            pieces += [{"uri": uri, "row_groups": [g]} for g in groups]
        else:
            pieces.append({"uri": uri, "row_groups": None})
    blocks = [pa.table({"uri": [p["uri"]], "row_groups": pa.array([p["row_groups"]], pa.list_(pa.int64()))})
              for p in pieces]
    return ray.data.from_arrow(blocks).map_batches(  # one block per piece: one read task each, no barrier
        _read_pieces, fn_kwargs={"columns": columns}, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def _read_text_table(batch: pa.Table, kind: str) -> Iterator[pa.Table]:
    for uri in batch["uri"].to_pylist():
        filesystem, path = storage.pyarrow_filesystem(uri)
        with filesystem.open_input_stream(path) as stream:
            if kind == "csv":
                for record_batch in pacsv.open_csv(stream):
                    yield pa.Table.from_batches([record_batch])
            else:  # newline-delimited JSON: pyarrow parses it in blocks of the file
                yield pajson.read_json(stream)


def read_text_table(uri: str, kind: str, num_cpus: float = 0.5):
    """One CSV (streamed in batches) or JSON-lines file as a Ray dataset."""
    import ray

    return ray.data.from_arrow(pa.table({"uri": [uri]})).map_batches(
        _read_text_table, fn_kwargs={"kind": kind}, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)
