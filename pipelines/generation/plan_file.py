"""An explicit generation plan (a Parquet, CSV or JSON-lines file, local or s3://, or rows a program passes) as
numbered raw rows: ``(order, where, row)``, ``row`` the JSON text of one plan row (null: a line that is not
UTF-8), ``where`` its place for error messages (``plan.jsonl line 3``, ``plan.parquet row 7``).

The driver only checks the file's head (its Parquet footer or first MiB): a missing, unreadable or empty file, or
one whose columns are not plan keys, fails the job at once in one line. The rows themselves are read by Ray tasks
(one per Parquet row group, one streaming task per text file) and checked row by row in the cluster
(``plan.explicit_plan_dataset``): a bad row becomes an error row, never a failed job.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from dreamcache import storage
from dreamcache.errors import InvalidValue

from ..kernel.listing import row_groups

RAW_SCHEMA = pa.schema([("order", pa.int64()), ("where", pa.string()), ("row", pa.string())])
ROWS_PER_BLOCK = 20_000
HEAD_BYTES = 1 << 20
TEXT_COLUMNS = ("subject_id", "prompt", "negative_prompt")  # read as text from a CSV, whatever they look like
PIECE_SCHEMA = pa.schema([("uri", pa.string()), ("row_group", pa.int64()), ("first_row", pa.int64())])


def plan_kind(uri: str) -> str:
    """``parquet``, ``csv`` or ``jsonl`` (any other name: JSON lines, as the job always read it)."""
    suffix = PurePosixPath(storage.parse_uri(uri).path).suffix.lower()
    return {".parquet": "parquet", ".csv": "csv"}.get(suffix, "jsonl")


def _is_data(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def data_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines that are neither blank nor ``#`` comments."""
    return ((number, line) for number, line in enumerate(text.splitlines(), 1) if _is_data(line))


def check_plan_file(uri: str, allowed: Collection[str]) -> int | None:
    """Fail at once, in one line, for a plan file that cannot be one; returns its row count when the footer
    gives it (Parquet: it sizes the shuffle), else None."""
    if not storage.exists(uri):
        raise storage.ObjectNotFound(f"plan file not found: {uri}")
    kind = plan_kind(uri)
    try:
        if kind == "parquet":
            filesystem, path = storage.pyarrow_filesystem(uri)
            with filesystem.open_input_file(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
            names, rows = metadata.schema.to_arrow_schema().names, metadata.num_rows
        else:
            head = storage.read_range(uri, 0, HEAD_BYTES)
            whole = len(head) < HEAD_BYTES
            if kind == "csv":
                head = head if whole else head[: head.rfind(b"\n") + 1]
                table = pacsv.read_csv(pa.BufferReader(head))
                names, rows = table.column_names, table.num_rows if whole else None
            else:  # the keys of JSON lines are checked row by row, in the cluster
                names = ["subject_id"]
                rows = sum(1 for _ in data_lines(head.decode("utf-8", "replace"))) if whole else None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidValue(f"plan {uri} is not a readable {kind} file: {exc}") from None
    if rows == 0:
        raise InvalidValue(f"the plan {uri!r} has no rows")
    unknown = set(names) - set(allowed)
    if unknown:
        raise InvalidValue(f"plan {uri}: unknown column(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "subject_id" not in names:
        raise InvalidValue(f"plan {uri}: 'subject_id' is required")
    return rows if kind == "parquet" else None


def plan_pieces(uri: str) -> list[dict]:
    """What each read task reads: a Parquet file's row groups (with their first row's number), else the file."""
    if plan_kind(uri) != "parquet":
        return [{"uri": uri, "row_group": None, "first_row": 0}]
    return [{"uri": uri, "row_group": group, "first_row": first} for group, first in row_groups(uri)]


def _raw(rows: list[tuple[int, str, str | None]]) -> pa.Table:
    return pa.table({"order": [r[0] for r in rows], "where": [r[1] for r in rows], "row": [r[2] for r in rows]},
                    schema=RAW_SCHEMA)


def _table_rows(table: pa.Table, uri: str, first: int) -> pa.Table:
    # Nulls are absent keys, as a JSON line would leave them out (the job's defaults then apply).
    return _raw([(first + i, f"{uri} row {first + i}", json.dumps({k: v for k, v in row.items() if v is not None},
                                                                  default=str))
                 for i, row in enumerate(table.to_pylist())])


def _json_line_blocks(stream, uri: str) -> Iterator[pa.Table]:
    """A JSON-lines stream in blocks of numbered lines, read 1 MiB at a time (a line may span reads)."""
    rows: list[tuple[int, str, str | None]] = []
    number, rest = 0, b""
    while True:
        chunk = stream.read(HEAD_BYTES)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop() if chunk else b""
        for raw in lines:
            number += 1
            try:
                line: str | None = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = None  # the row check reports it with its line (decoded with replacements, it could pass)
            if line is None or _is_data(line):
                rows.append((number, f"{uri} line {number}", line))
        if len(rows) >= ROWS_PER_BLOCK or (not chunk and rows):
            yield _raw(rows)
            rows = []
        if not chunk:
            return


def read_plan_pieces(batch: pa.Table) -> Iterator[pa.Table]:
    """Read tasks: each piece of ``batch`` (:data:`PIECE_SCHEMA`) -> blocks of :data:`RAW_SCHEMA` rows."""
    for piece in batch.to_pylist():
        uri = piece["uri"]
        filesystem, path = storage.pyarrow_filesystem(uri)
        kind = plan_kind(uri)
        if kind == "parquet":
            with filesystem.open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(piece["row_group"])
            for start in range(0, table.num_rows, ROWS_PER_BLOCK):
                yield _table_rows(table.slice(start, ROWS_PER_BLOCK), uri, piece["first_row"] + start)
        elif kind == "csv":
            options = pacsv.ConvertOptions(column_types={c: pa.string() for c in TEXT_COLUMNS})
            first = 0
            with filesystem.open_input_stream(path) as stream:
                for record_batch in pacsv.open_csv(stream, convert_options=options):
                    yield _table_rows(pa.Table.from_batches([record_batch]), uri, first)
                    first += record_batch.num_rows
        else:
            with filesystem.open_input_stream(path) as stream:
                yield from _json_line_blocks(stream, uri)


def _items(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows a program passes (already in its memory) as raw rows."""
    try:
        return _raw([(i, f"plan row {i}", json.dumps(dict(row), default=str)) for i, row in enumerate(rows)])
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"plan rows must be mappings of plan keys: {exc}") from None


def raw_plan_dataset(source: str | Sequence[Mapping[str, Any]]):
    """The plan's raw rows as a Ray dataset, read by the cluster (one task per piece)."""
    if not isinstance(source, str):
        return ray.data.from_arrow(_items(source))
    blocks = [pa.Table.from_pylist([p], schema=PIECE_SCHEMA) for p in plan_pieces(source)]
    return ray.data.from_arrow(blocks).map_batches(  # one block per piece: one read task each
        read_plan_pieces, batch_size=1, batch_format="pyarrow", num_cpus=0.5)


def raw_plan_tables(source: str | Sequence[Mapping[str, Any]]) -> Iterator[pa.Table]:
    """The same raw rows read in this process (``plan.build_plan``: tests and small tools)."""
    if not isinstance(source, str):
        yield _items(source)
        return
    yield from read_plan_pieces(pa.Table.from_pylist(plan_pieces(source), schema=PIECE_SCHEMA))
