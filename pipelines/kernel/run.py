"""The run driver every job shares: result rows written by the workers, counted in the cluster, merged with the
last manifest and published in one commit; progress as a line every few seconds (a bar on a terminal).

    run = JobRun(manifest_log, run_id)
    published = run.publish(results, planned=total, label="caching")   # results: a Ray dataset of manifest rows

The driver holds counters and a file list (one name per part file), never rows: its memory does not grow with
the number of subjects. "Exactly one row per input" is checked from the workers' counts before anything is
published; a mismatch is a bug and publishes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from dreamcache import storage

from .listing import read_parquet_files
from .manifest import CommitConflict, ManifestLog, ManifestVersion, conform

logger = logging.getLogger(__name__)

STATS_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("counts", pa.string())])
COUNT_COLUMNS = ("status", "action")
ROWS_PER_FILE = 50_000
# CPUs of the kernel's light stages (tagging, writing manifest parts, reading them): fractional so they overlap the
# jobs' own stages, but not so small that a 2-CPU node starts a dozen worker processes for them.
LIGHT_CPUS = 0.5  # manifest part files: few enough to list, small enough to write from one task
MAX_COMMIT_ATTEMPTS = 5


def count_rows(table: pa.Table) -> dict[str, int]:
    """``{"rows": n, "status:ok": .., "action:skipped": ..}``: what progress and summaries report."""
    counts = {"rows": table.num_rows}
    for column in COUNT_COLUMNS:
        if column in table.column_names:
            for item in pc.value_counts(table[column]).to_pylist():
                counts[f"{column}:{item['values']}"] = item["counts"]
    return counts


def _write_part(batch: pa.Table, folder: str, schema: pa.Schema, name: str,
                count: Callable[[pa.Table], dict[str, int]]) -> pa.Table:
    """One part file per batch, written by the worker; returns one stats row (never the rows)."""
    table = conform(batch, schema)
    uri = storage.join_uri(folder, f"{name}-{uuid.uuid4().hex}.parquet")
    storage.write_parquet(uri, table)
    return pa.table({"file": [uri], "rows": [table.num_rows], "counts": [json.dumps(count(table))]},
                    schema=STATS_SCHEMA)


def tap_progress(batch: pa.Table, counter: "Tally", count: Callable[[pa.Table], dict[str, int]]) -> pa.Table:
    """A pass-through stage that reports each batch's counts as soon as it is done (before the part files,
    which gather many batches)."""
    counter.add(count(batch))
    return batch


@dataclass
class _Counts:
    counts: Counter = field(default_factory=Counter)
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    first: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (first reported, its count then)


class _Counter:
    """The driver's counter actor: the tallies of its runs, each under a key of its own. One per driver, not one
    per run: each actor is a worker process (about a second of start-up and of CPU on a small machine), and a
    driver may run many jobs (the evaluation job runs two, a scheduler one per period)."""

    def __init__(self) -> None:
        self.tallies: dict[str, _Counts] = {}

    def _of(self, tally: str) -> _Counts:
        return self.tallies.setdefault(tally, _Counts())

    def add(self, tally: str, counts: Mapping[str, int]) -> None:
        state = self._of(tally)
        state.counts.update(counts)
        for key, value in counts.items():
            if value and key not in state.first:
                state.first[key] = (time.time(), state.counts[key])

    def put(self, tally: str, part: str, counts: Mapping[str, int]) -> None:
        """Counts of one part (a block, by a key of its own): a retried task replaces its part, never adds twice."""
        self._of(tally).parts[part] = dict(counts)

    def snapshot(self, tally: str) -> dict[str, int]:
        state = self.tallies.get(tally, _Counts())
        total = Counter(state.counts)
        for counts in state.parts.values():
            total.update(counts)
        return dict(total)

    def firsts(self, tally: str) -> dict[str, tuple[float, int]]:
        return dict(self.tallies.get(tally, _Counts()).first)

    def reset(self, tally: str) -> None:
        self.tallies[tally] = _Counts()

    def drop(self, tally: str) -> None:
        self.tallies.pop(tally, None)


@dataclass(frozen=True)
class Tally:
    """One run's counts in the driver's counter actor, handed to the stages that report to it."""

    actor: Any
    key: str

    def add(self, counts: Mapping[str, int]) -> None:
        self.actor.add.remote(self.key, counts)  # not waited for: a progress report

    def put(self, part: str, counts: Mapping[str, int]) -> None:
        """Waited for: the stage's task ends only once its counts are in (a count, not a progress report)."""
        import ray

        ray.get(self.actor.put.remote(self.key, part, counts))

    def snapshot(self, timeout: float | None = None) -> dict[str, int]:
        import ray

        return ray.get(self.actor.snapshot.remote(self.key), timeout=timeout)

    def firsts(self) -> dict[str, tuple[float, int]]:
        import ray

        return ray.get(self.actor.firsts.remote(self.key))

    def reset(self) -> None:
        import ray

        ray.get(self.actor.reset.remote(self.key))

    def close(self) -> None:
        self.actor.drop.remote(self.key)


@functools.cache
def _driver_counter(node_id: str, job_id: str):
    """The counter actor of this process's Ray job. Cached here because Ray ends an actor once no handle to it is
    left, even a named one: without a handle kept between runs, each run would start (and wait for) a new one.
    It ends with the job (the driver's disconnect). Keyed by node and job: after ``ray.shutdown()`` a new local
    Ray numbers its jobs from 1 again, and only its node id tells it from the old one."""
    import ray

    return ray.remote(num_cpus=0)(_Counter).options(name=f"dreamcache-tally-{job_id}", get_if_exists=True).remote()


def new_tally() -> Tally:
    """A tally of its own in the driver's counter actor: stages report to it and the driver reads it once they
    have run, so counts need no other pass over the data."""
    import ray

    context = ray.get_runtime_context()
    return Tally(_driver_counter(context.get_node_id(), context.get_job_id()), uuid.uuid4().hex)


def format_counts(counts: Mapping[str, int]) -> str:
    """``ok 3, error 1 | computed 2, skipped 1, failed 1``: statuses, then actions."""
    groups = []
    for column in COUNT_COLUMNS:
        parts = [f"{k.split(':', 1)[1]} {v:,}" for k, v in sorted(counts.items()) if k.startswith(column + ":") and v]
        if parts:
            groups.append(", ".join(parts))
    return " | ".join(groups)


class Progress:
    """``label: done/total (pct), ok n, error n, skipped n, ... rows/s`` every ``interval`` seconds on stderr
    (a tqdm bar on a terminal), from a counter actor the stages report to."""

    def __init__(self, label: str, total: int | None, interval: float = 5.0, counter=None) -> None:
        """``counter``: a tally the job already has (``new_tally``), emptied and reused; otherwise one of its
        own. Either way the progress line is its last reader: it is closed at the end, failed or not."""
        self.label, self.total, self.interval = label, total, interval
        if counter is None:
            counter = new_tally()
        else:
            counter.reset()  # emptied before any stage of this phase reports to it
        self.counter = counter
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self.started_at = time.time()
        self._bar = None
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=label, unit="row", dynamic_ncols=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.report()
        if self._bar is not None:
            self._bar.close()
        self.counter.close()

    def first(self, key: str) -> tuple[float, int] | None:
        """(seconds after the start when ``key`` was first reported, its count then): e.g. when the first batch
        of computed subjects came back, to tell start-up from steady state."""
        seen = self.counter.firsts().get(key)
        return (seen[0] - self.started_at, seen[1]) if seen else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        try:
            counts = self.counter.snapshot(timeout=10)
        except Exception:  # noqa: BLE001 - a late or lost progress poll must never fail the run
            return
        done = counts.get("rows", 0)
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(format_counts(counts), refresh=True)
            return
        total = f"/{self.total:,} ({100 * done / self.total:.0f}%)" if self.total else ""
        print(f"{self.label}: {done:,}{total} rows; {format_counts(counts)}; {rate:,.1f} rows/s", file=sys.stderr,
              flush=True)


@dataclass
class Published:
    version: ManifestVersion
    counts: dict[str, int]  # this run's rows
    kept: int  # rows of earlier runs carried into this version

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)


def _write(ds, folder: str, schema: pa.Schema, name: str, rows_per_file: int,
           count: Callable[[pa.Table], dict[str, int]] = count_rows) -> tuple[list[str], Counter]:
    stats = ds.map_batches(_write_part, fn_kwargs={"folder": folder, "schema": schema, "name": name,
                                                   "count": count},
                           batch_size=rows_per_file, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    files: list[str] = []
    totals: Counter = Counter()
    for batch in stats.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            files.append(row["file"])
            totals.update(json.loads(row["counts"]))
    return files, totals


class JobRun:
    """One run of a job kind: where its rows go, and how they are published."""

    def __init__(self, log: ManifestLog, run_id: str, rows_per_file: int = ROWS_PER_FILE,
                 count: Callable[[pa.Table], dict[str, int]] = count_rows) -> None:
        self.log, self.run_id, self.rows_per_file, self.count = log, run_id, rows_per_file, count
        self.folder = log.data_prefix(run_id)
        self.parent = log.current()  # read once: the prior state this run plans against

    def prior(self, columns: list[str] | None = None):
        """The last published rows as a dataset (None on a first run)."""
        return self.log.dataset(self.parent, columns) if self.parent else None

    def publish(self, results, planned: int, label: str, progress: Progress | None = None,
                seen_before: int | None = None) -> Published:
        """Write ``results`` (a dataset of manifest rows, one per input), check the count, merge the rows of
        earlier runs this run did not produce, and commit. ``seen_before``: how many of this run's keys the last
        version holds; when that is all of them there is nothing to merge (no second shuffle)."""
        if progress is not None:
            results = results.map_batches(tap_progress, fn_kwargs={"counter": progress.counter, "count": self.count},
                                          batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS)
        files, counts = _write(results, self.folder, self.log.schema, "part", self.rows_per_file, self.count)
        if counts.get("rows", 0) != planned:  # every input ends in exactly one row: anything else is a bug
            raise RuntimeError(f"{label}: {planned} inputs planned but {counts.get('rows', 0)} result rows "
                               f"written ({self.folder}); nothing was published")
        parent = self.parent
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            if attempt == 0 and parent is not None and seen_before == parent.rows:
                kept_files, kept = [], 0
            else:
                kept_files, kept = self._keep_others(parent, files, planned)
            try:
                version = self.log.commit(self.run_id, files + kept_files, planned + kept,
                                          dict(counts), parent)
                return Published(version, dict(counts), kept)
            except CommitConflict:
                logger.warning("%s: another run published first; merging again on top of it", label)
                for uri in kept_files:  # never referenced by a commit: removing them destroys nothing
                    storage.delete(uri)
                parent = self.log.current()
        raise RuntimeError(f"{label}: could not publish after {MAX_COMMIT_ATTEMPTS} attempts (concurrent runs)")

    def _keep_others(self, parent: ManifestVersion | None, files: list[str], planned: int) -> tuple[list[str], int]:
        """Rows of ``parent`` whose key this run did not write: a run never removes another run's rows."""
        if parent is None or parent.rows == 0:
            return [], 0
        key = self.log.key
        others = self.log.dataset(parent)
        if files:
            mine = read_parquet_files(files, columns=[key], num_cpus=LIGHT_CPUS)
            key_schema = pa.schema([self.log.schema.field(key)])
            others = colocate({"prior": (others, self.log.schema), "mine": (mine, key_schema)}, key,
                              partitions_for(parent.rows + planned))
            others = others.map_batches(_anti_join, fn_kwargs={"key": key, "schema": self.log.schema},
                                        batch_format="pyarrow", batch_size=None)
        kept_files, counts = _write(others, self.folder, self.log.schema, "kept", self.rows_per_file)
        return kept_files, counts.get("rows", 0)


def _anti_join(block: pa.Table, key: str, schema: pa.Schema) -> pa.Table:
    parts = split_sources(block, {"prior": schema, "mine": pa.schema([schema.field(key)])})
    return parts["prior"].filter(pc.invert(pc.is_in(parts["prior"][key], value_set=parts["mine"][key])))

SOURCE = "_source"  # which input a colocated row came from


def _tag(batch: pa.Table, tag: str, schema: pa.Schema) -> pa.Table:
    table = conform(batch, schema)
    return table.set_column(schema.get_field_index(SOURCE), SOURCE, pa.array([tag] * batch.num_rows, pa.string()))


def colocate(sources: Mapping[str, tuple], key: str, partitions: int):
    """Several datasets hash-partitioned together by ``key``: every block of the result holds all rows of its
    keys from every source, tagged in :data:`SOURCE` (``sources``: tag -> (dataset, its schema)). A job then
    joins, groups or anti-joins within each block with pyarrow, one shuffle for all of it: this is the
    distributed join of a plan with the last manifest and the store's listing."""
    import ray

    fields: dict[str, pa.Field] = {SOURCE: pa.field(SOURCE, pa.string())}
    for _, schema in sources.values():
        for f in schema:
            if f.name in fields and fields[f.name].type != f.type:
                raise TypeError(f"column {f.name!r} has two types across sources: {fields[f.name].type}, {f.type}")
            fields[f.name] = f
    wide = pa.schema(list(fields.values()))
    tagged = [ds.map_batches(_tag, fn_kwargs={"tag": tag, "schema": wide}, batch_format="pyarrow", batch_size=None,
                             num_cpus=LIGHT_CPUS)
              for tag, (ds, _) in sources.items()]
    union = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    # Ray hands an empty block to the next stage without calling its function, so an empty block keeps the schema
    # of whatever made it (or none), and the shuffle's concatenation would fail on it: the union is computed
    # first (into the object store, as the shuffle would: it is a barrier anyway) and only non-empty blocks go on.
    blocks = [ref for bundle in union.materialize().iter_internal_ref_bundles()
              for ref, meta in zip(bundle.block_refs, bundle.metadata) if meta.num_rows]
    union = ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(wide.empty_table())
    # Hash repartitioning never splits a partition over blocks (Ray plans it with disallow_block_splitting), so a
    # block-local group or join sees every row of its keys.
    return union.repartition(partitions, keys=[key])


def split_sources(block: pa.Table, schemas: Mapping[str, pa.Schema]) -> dict[str, pa.Table]:
    """A colocated block back into one table per source, each in its own schema."""
    tags = block[SOURCE]
    return {tag: conform(block.filter(pc.equal(tags, tag)), schema) for tag, schema in schemas.items()}


def partitions_for(rows: int | None) -> int:
    """Hash partitions for ``rows`` rows (about 250k each, so one fits a worker), or, when the size is not known
    before listing, two per CPU of the cluster."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 2))
    if rows is None:
        return max(4, 2 * cpus)
    return max(2, min(1000, max(rows // 250_000 + 1, cpus)))
