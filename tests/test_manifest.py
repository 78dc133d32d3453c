"""Manifests that lose nothing: versions published in one commit, merged across runs, one folder per job kind,
readable without this project's code; the caching job's incremental rules at the store's level."""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamcache import storage
from dreamcache.errors import DreamCacheError
from pipelines.caching import CachingJobConfig, JobInputError, run_caching
from pipelines.kernel.manifest import CommitConflict, ManifestError, ManifestLog

from .manifests import latest_commit, manifest_rows

REPO = Path(__file__).resolve().parent.parent



def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def refs(root: Path, colours: dict[str, str]) -> str:
    for subject, colour in colours.items():
        (root / subject).mkdir(parents=True, exist_ok=True)
        (root / subject / "1.png").write_bytes(png(colour))
    return str(root)


def cache(tiny_model_dir, images: str, out: str, **kw):
    return run_caching(CachingJobConfig(out=out, model=str(tiny_model_dir), images=images, batch_size=4, **kw))


@pytest.mark.timeout(900)  # three caching runs and a generation run: about 100 s on 2 cores, 300 s loaded
def test_runs_merge_repairs_and_never_collide(ray_cluster, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    first = refs(tmp_path / "a", {"red": "red", "blue": "blue", "white": "white", "black": "black"})
    second = refs(tmp_path / "b", {"green": "green"})
    assert cache(tiny_model_dir, first, out).computed == 4
    # Make it what an older release wrote: one manifest.parquet at the prefix, no _manifests folder. It is the
    # prior state: its rows are kept by a run that does not plan them, and decide what is skipped.
    table = pq.read_table(latest_commit(out, "caching")["files"])
    storage.write_parquet(f"{out}/manifest.parquet", table.drop_columns(["read_s", "write_s"]))
    for uri in storage.list_files(f"{out}/_manifests"):
        storage.delete(uri)
    # Another catalog into the same prefix: its subjects join, the first run's rows stay.
    summary = cache(tiny_model_dir, second, out)
    rows = manifest_rows(out)
    assert set(rows) == {"red", "blue", "white", "black", "green"} and summary.kept == 4 and summary.computed == 1
    assert latest_commit(out, "caching")["version"] == 1 and latest_commit(out, "caching")["rows"] == 5

    # A stored cache cut short, emptied or deleted is recomputed, not reported "ok skipped"; an intact one is
    # skipped on the row carried over from the legacy file. All in one run: each caching run costs 15-20 s of
    # the suite on 2 cores.
    red, blue, white = (tmp_path / "out" / f"{s}.safetensors" for s in ("red", "blue", "white"))
    red.write_bytes(red.read_bytes()[:-10])
    blue.unlink()
    white.write_bytes(b"")
    summary = cache(tiny_model_dir, first, out)
    rows = manifest_rows(out)
    assert (summary.computed, summary.skipped) == (3, 1)
    assert {rows[s]["action"] for s in ("red", "blue", "white")} == {"computed"} and rows["black"]["action"] == "skipped"
    assert all(rows[s]["bytes"] == f.stat().st_size > 0 for s, f in (("red", red), ("blue", blue), ("white", white)))
    assert rows["green"]["action"] == "computed" and rows["green"]["run_id"] != rows["red"]["run_id"]

    # A generation run into the caching prefix keeps its manifest beside the caching one, under its own kind.
    from pipelines.generation import GenerationJobConfig, run_generation

    before = manifest_rows(out)
    generation = run_generation(GenerationJobConfig(
        model=str(tiny_model_dir), adapter=str(tiny_model_dir / "adapter.safetensors"), caches=out, out=out,
        prompts=["a toy"], seeds=[0], steps=1, contact_sheet="none", batch_size=4))
    assert generation.rendered == 5 and manifest_rows(out) == before
    assert len(manifest_rows(out, "generation", key="row_key")) == 5

    # pyarrow alone, from the commit's file list; and duckdb where it is installed.
    files = latest_commit(out, "caching")["files"]
    assert pq.read_table(files).num_rows == 5
    duckdb = pytest.importorskip("duckdb")
    latest = tmp_path / "out" / "_manifests" / "caching" / "_latest.json"
    con = duckdb.connect()
    con.execute(f"SET VARIABLE f = (SELECT files FROM read_json('{latest}'))")
    assert con.execute("SELECT count(*) FROM read_parquet(getvariable('f'))").fetchone()[0] == 5


def test_bad_manifests_and_outputs_are_refused(ray_cluster, tiny_model_dir, tmp_path):
    images = refs(tmp_path / "refs", {"red": "red"})
    with pytest.raises(JobInputError, match="inside --images"):
        CachingJobConfig(out=images, model=str(tiny_model_dir), images=images)
    with pytest.raises(JobInputError, match="inside --images"):
        CachingJobConfig(out=images + "/caches", model=str(tiny_model_dir), images=images)
    # Actors no node can hold fail the run at once, in one line, instead of waiting for nodes forever.
    with pytest.raises(DreamCacheError, match="GPU 1 on one node, but no node"):
        cache(tiny_model_dir, images, str(tmp_path / "gpu-out"), gpus_per_actor=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="manifest.parquet is not a Parquet manifest"):
        cache(tiny_model_dir, images, str(out))
    (out / "manifest.parquet").unlink()
    cache(tiny_model_dir, images, str(out))
    commit = next((out / "_manifests" / "caching" / "_commits").iterdir())
    commit.write_text("{not json")
    with pytest.raises(ManifestError, match=commit.name):
        cache(tiny_model_dir, images, str(out))


def test_commits_are_create_if_absent(tmp_path):
    schema = pa.schema([("k", pa.string())])
    log = ManifestLog(str(tmp_path), "demo", schema, key="k")
    storage.write_parquet(str(tmp_path / "p.parquet"), pa.table({"k": ["a"]}, schema=schema))
    first = log.commit("run-1", [str(tmp_path / "p.parquet")], 1, {}, None)
    with pytest.raises(CommitConflict):
        log.commit("run-2", [str(tmp_path / "p.parquet")], 1, {}, None)  # planned against the same parent
    assert log.current().run_id == "run-1" and log.current().version == first.version == 1


def _publish(log: ManifestLog, run_id: str, rows: pa.Table) -> str:
    """One run's rows written under its data folder and published on top of the current version, without a job."""
    from pipelines.kernel.manifest import conform

    uri = storage.join_uri(log.data_prefix(run_id), "part-0.parquet")
    storage.write_parquet(uri, conform(rows, log.schema))
    log.commit(run_id, [uri], rows.num_rows, {"rows": rows.num_rows}, log.current())
    return uri


def test_manifest_command(tmp_path, capsys):
    """The command reads a caching manifest in the job's own schema (published here directly: a job run costs
    15-20 s of the suite, and the job's manifests are read back by the tests above)."""
    from pipelines.caching.job import manifest_log
    from pipelines.cli import main

    out = str(tmp_path / "out")
    _publish(manifest_log(out), "run1", pa.table({
        "subject_id": ["red", "bad"], "status": ["ok", "error"], "action": ["computed", "failed"],
        "error": [None, "bad/x.png: not an image"]}))
    # In-process, as tests/test_cli.py runs the CLI: a subprocess per call cost seconds of imports each.
    assert main(["manifest", out]) == 0
    done = capsys.readouterr()
    assert "caching" in done.out and "ok 1" in done.out and "error 1" in done.out and "bad/x.png" in done.out
    assert main(["manifest", out, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["subject_id"] for r in rows} == {"red", "bad"}
    assert main(["manifest", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no manifest" in err


def test_one_row_per_input_at_20k_subjects(ray_cluster, tiny_model_dir, tmp_path):
    """Every input subject ends in exactly one row, counted in the cluster: 20k catalog rows whose references
    cannot be used (no model compute), grouped into 20k subjects."""
    n = 20_000
    ids = [f"s{i:05d}" for i in range(n)]
    uris = [f"http://example.invalid/{s}.png" if i % 2 else "" for i, s in enumerate(ids)]
    pq.write_table(pa.table({"subject_id": ids, "image_uri": uris}), tmp_path / "catalog.parquet")
    summary = run_caching(CachingJobConfig(out=str(tmp_path / "out"), model=str(tiny_model_dir),
                                           catalog=str(tmp_path / "catalog.parquet")))
    assert (summary.errors, summary.computed, summary.skipped) == (n, 0, 0)
    table = pq.read_table(latest_commit(str(tmp_path / "out"), "caching")["files"], columns=["subject_id", "error"])
    assert table.num_rows == n and len(set(table["subject_id"].to_pylist())) == n
    errors = table["error"].to_pylist()
    assert sum("unsupported URI scheme" in e for e in errors) == n // 2 and sum("no image_uri" in e for e in errors) == n // 2


# -- vacuum: old versions go, what a reader or a running job may still need stays ---------------------------------
VACUUM_SCHEMA = pa.schema([pa.field("subject_id", pa.string()), pa.field("status", pa.string())])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_vacuum_removes_old_versions_and_keeps_what_readers_and_running_jobs_need(where, tmp_path, request, capsys):
    import time

    from pipelines.cli import main

    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_prefix") + "/out"
    log = ManifestLog(out, "caching", VACUUM_SCHEMA, key="subject_id")
    rows = pa.table({"subject_id": ["a", "b"], "status": ["ok", "ok"]})
    files = [_publish(log, f"run{i}", rows) for i in range(1, 5)]
    unpublished = storage.join_uri(log.data_prefix("killed"), "part-0.parquet")  # a killed (or running) job's
    storage.write_parquet(unpublished, pa.table({"subject_id": ["a"], "status": ["ok"]}))

    # Every version was the current one within the last hour: a job that started on it may still read it.
    now = log.vacuum(keep_versions=2, retain_s=3600, dry_run=True)
    assert now.removed_versions == () and now.removed_files == 0 and now.young_unpublished == 1
    # Two hours on, versions 1 and 2 and the unpublished file are past the retention; a dry run removes nothing.
    later = time.time() + 2 * 3600
    dry = log.vacuum(keep_versions=2, retain_s=3600, dry_run=True, now=later)
    assert (dry.kept_versions, dry.removed_versions, dry.removed_files) == ((3, 4), (1, 2), 3)
    assert all(storage.exists(f) for f in [*files, unpublished])
    done = log.vacuum(keep_versions=2, retain_s=3600, now=later)
    assert done.removed_versions == (1, 2) and done.removed_bytes > 0
    assert [storage.exists(f) for f in [*files, unpublished]] == [False, False, True, True, False]
    assert not storage.exists(log.commit_uri(1)) and storage.exists(log.commit_uri(3))
    current = log.current()
    assert current.version == 4 and sum(b.num_rows for b in log.iter_batches(current)) == 2
    assert log.vacuum(keep_versions=2, retain_s=3600, now=later).removed_files == 0  # nothing left to do
    # The next publish still numbers on from the current version.
    _publish(log, "run5", rows)
    assert log.current().version == 5

    # The command: one line per manifest; bad values and a prefix without manifests are one line, exit 2.
    capsys.readouterr()
    assert main(["vacuum", out, "--dry-run"]) == 0
    assert "caching manifest: " in capsys.readouterr().out
    for bad in (["vacuum", out, "--keep-versions", "0"], ["vacuum", out, "--retain-hours", "-1"],
                ["vacuum", str(tmp_path / "nothing")]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err


def test_runs_of_one_driver_share_one_counter_actor_with_a_tally_each(ray_cluster):
    from pipelines.kernel.run import new_tally

    first, second = new_tally(), new_tally()
    first.add({"rows": 1})
    second.put("part-a", {"rows": 5})
    second.put("part-a", {"rows": 4})  # a retried task replaces its part's counts
    assert first.snapshot() == {"rows": 1} and second.snapshot() == {"rows": 4}
    # One actor (one worker process) for every run of this driver: the one the session's earlier jobs made.
    driver_counter = ray_cluster.get_actor(f"dreamcache-tally-{ray_cluster.get_runtime_context().get_job_id()}")
    assert first.actor._actor_id == second.actor._actor_id == driver_counter._actor_id
    first.close()
    assert first.snapshot() == {} and second.snapshot() == {"rows": 4}
    # Between runs no tally is held: Ray would end an actor nobody holds; the driver keeps it for its next run.
    actor_id = first.actor._actor_id
    del first, second, driver_counter
    gc.collect()
    time.sleep(1)
    third = new_tally()
    assert third.actor._actor_id == actor_id and third.snapshot() == {}


def test_a_second_local_ray_in_one_process_gets_a_counter_of_its_own(tmp_path):
    """After ray.shutdown() a new local Ray numbers its jobs from 1 again: a counter handle kept by job id alone
    would point into the old cluster ("Can't find actor ..."). In a process of its own: the session's Ray stays."""
    script = ("import ray\nfrom pipelines.kernel.run import new_tally\n"
              "for i in range(2):\n"
              "    ray.init(num_cpus=1, include_dashboard=False)\n"
              "    tally = new_tally(); tally.add({'rows': 1}); print('counts', tally.snapshot())\n"
              "    ray.shutdown()\n")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("counts {'rows': 1}") == 2, done.stdout
