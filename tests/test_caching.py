"""The catalog caching job end to end: real SeaweedFS S3, real local Ray, the tiny model read from S3."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from dreamcache import storage
from dreamcache.cache import FeatureCache
from pipelines.caching import CachingJobConfig, JobInputError, run_caching
from pipelines.kernel.ray_runtime import local_system_config

from .bad_inputs import FOLDER_MARKER, Materials, cases, put_folder_marker
from .manifests import manifest_rows

REPO = Path(__file__).resolve().parents[1]


def png(colour, size=(72, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 80), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def manifest(out: str) -> dict[str, dict]:
    return manifest_rows(out, "caching")


@pytest.fixture(scope="module")
def model_uri(s3_server, tiny_model_dir):
    uri = f"s3://{s3_server.bucket}/caching-model"
    storage.upload_dir(tiny_model_dir, uri)
    return uri


LONG_ID = "x" * 129
# The bad-input corpus's subject folders (tests/bad_inputs.py) join this prefix run: the listing is their only
# entry point, and a job of their own would cost tens of seconds for what this run already does.
CORPUS_FOLDERS = cases("folder", entry="caching")


def put_folder(root: str, subject: str, files: dict[str, bytes]) -> None:
    """A corpus folder under ``root``: its files, and its marker keys (ending in "/"), which write_bytes refuses."""
    for key, data in files.items():
        uri = f"{root}/{subject}/" + ("" if key == FOLDER_MARKER else key)
        if uri.endswith("/"):
            put_folder_marker(uri)
        else:
            storage.write_bytes(uri, data)


@pytest.fixture(scope="module")
def catalog(s3_server, tmp_path_factory, tiny_model_dir):
    """A prefix of subjects, good and bad (the corpus's folders among them)."""
    root = f"s3://{s3_server.bucket}/caching-refs-{os.getpid()}"
    files = {
        "red/1.png": png("red"),
        "duo/a.png": png("blue"),
        "duo/b.jpg": jpeg("green"),
        "duo/.DS_Store": b"junk",  # hidden files are not references
        "corrupt/x.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
        "empty/e.png": b"",
        "text/readme.txt": b"hello",
        "huge/big.png": png("white", size=(400, 400)),
        "a..b/1.png": png("red"),
        "bad\x01id/1.png": png("red"),
        f"{LONG_ID}/1.png": png("red"),
        "stray.png": png("red"),
    }
    for key, data in files.items():
        storage.write_bytes(f"{root}/{key}", data)
    ctx = Materials(tmp_path_factory.mktemp("caching-corpus"), tiny_model_dir, b"", root)
    for case in CORPUS_FOLDERS:
        put_folder(root, case.name, case.make(ctx))
    return root


def config(catalog, out, model_uri, **kw) -> CachingJobConfig:
    kw.setdefault("batch_size", 2)
    return CachingJobConfig(out=out, model=model_uri, images=catalog, max_image_pixels=200 * 200, **kw)


@pytest.fixture(scope="module")
def first_run(ray_cluster, catalog, model_uri, s3_server):
    out = f"s3://{s3_server.bucket}/caching-out-{os.getpid()}"
    return out, run_caching(config(catalog, out, model_uri))


def test_every_subject_ends_in_exactly_one_row(first_run, tiny_pipe):
    out, summary = first_run
    rows = manifest(out)
    folders = {case.name for case in CORPUS_FOLDERS}
    assert set(rows) == {"red", "duo", "corrupt", "empty", "text", "huge", "a..b", "bad\x01id", LONG_ID,
                         "stray.png"} | folders
    assert (summary.computed, summary.errors) == (2, 8 + len(folders))
    wrong = [f"{c.name}: {rows[c.name]['error']!r}" for c in CORPUS_FOLDERS
             if c.caching not in (rows[c.name]["error"] or "")]
    assert not wrong, "\n".join(wrong)
    for subject in ("red", "duo"):
        assert rows[subject]["status"] == "ok" and rows[subject]["action"] == "computed"
        cache = tiny_pipe.load_cache(rows[subject]["cache_uri"])  # same base model: the S3 copy of the tiny model
        assert cache.num_references == rows[subject]["num_references"] == (2 if subject == "duo" else 1)
        assert rows[subject]["bytes"] == storage.size(rows[subject]["cache_uri"])
        assert rows[subject]["base_model"] == tiny_pipe.base_model
    reasons = {s: rows[s]["error"] for s in rows if rows[s]["status"] == "error"}
    assert "corrupt" in reasons["corrupt"] or "truncated" in reasons["corrupt"] or "not an image" in reasons["corrupt"]
    assert "empty" in reasons["empty"]
    assert "not an image" in reasons["text"]
    assert "exceeds" in reasons["huge"] or "pixels" in reasons["huge"]
    assert "subject id" in reasons["a..b"] and "subject id" in reasons["bad\x01id"] and "subject id" in reasons[LONG_ID]
    assert "not inside" in reasons["stray.png"]
    assert all(rows[s]["cache_uri"] is None for s in reasons)


def test_cache_equals_the_in_process_method(first_run, tiny_pipe):
    out, _ = first_run
    job = FeatureCache.from_bytes(storage.read_bytes(f"{out}/red.safetensors"), "red", tiny_pipe.layers, tiny_pipe.base_model)
    direct = tiny_pipe.build_caches([Image.open(io.BytesIO(png("red")))], list(job.info.source_hashes))[0]
    for name, value in direct.features.items():
        torch.testing.assert_close(job.features[name].float(), value.float(), rtol=5e-3, atol=3e-3)


def test_rerun_does_no_work_and_writes_no_duplicates(first_run, catalog, model_uri, capsys):
    out, _ = first_run
    before = {s: storage.stat(r["cache_uri"]).version for s, r in manifest(out).items() if r["cache_uri"]}
    summary = run_caching(config(catalog, out, model_uri))
    assert (summary.computed, summary.skipped) == (0, 6)  # the 4 unusable subject ids are reported, not "skipped"
    # The progress line counts each result row once: the plan's tally, reused for it, starts empty again.
    [*_, last] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("caching: ")]
    done, planned = map(int, re.match(r"caching: ([\d,]+)/([\d,]+) ", last.replace(",", "")).groups())
    assert done == planned == len(manifest(out)), last
    rows = manifest(out)
    assert len(rows) == 10 + len(CORPUS_FOLDERS) and {r["action"] for r in rows.values()} == {"skipped", "failed"}
    assert {s: storage.stat(r["cache_uri"]).version for s, r in rows.items() if r["cache_uri"]} == before
    assert rows["corrupt"]["status"] == "error"  # bad input stays reported


def test_new_and_changed_subjects_only(first_run, catalog, model_uri):
    out, _ = first_run
    storage.write_bytes(f"{catalog}/green/1.png", png("green"))
    storage.write_bytes(f"{catalog}/red/1.png", png("purple"))
    storage.write_bytes(f"{catalog}/corrupt/x.png", png("yellow"))  # a fixed image recovers
    try:
        summary = run_caching(config(catalog, out, model_uri))
        rows = manifest(out)
        computed = {s for s, r in rows.items() if r["action"] == "computed"}
        assert computed == {"green", "red", "corrupt"} and summary.computed == 3
        assert rows["duo"]["action"] == "skipped"
    finally:
        storage.write_bytes(f"{catalog}/red/1.png", png("red"))
        storage.write_bytes(f"{catalog}/corrupt/x.png", b"broken")
        storage.delete(f"{catalog}/green/1.png")


def test_catalog_file_input(ray_cluster, catalog, model_uri, s3_prefix):
    lines = [
        {"subject_id": "cat", "image_uri": f"{catalog}/duo/a.png"},
        {"subject_id": "cat", "image_uri": f"{catalog}/red/1.png"},
        {"subject_id": "ghost", "image_uri": f"{catalog}/nope/missing.png"},
        {"subject_id": "../escape", "image_uri": f"{catalog}/red/1.png"},
    ]
    catalog_uri = f"{s3_prefix}/catalog.jsonl"
    storage.write_bytes(catalog_uri, "\n".join(json.dumps(l) for l in lines).encode())
    out = f"{s3_prefix}/out"
    summary = run_caching(CachingJobConfig(out=out, model=model_uri, catalog=catalog_uri, batch_size=2))
    rows = manifest(out)
    assert set(rows) == {"cat", "ghost", "../escape"} and summary.computed == 1
    assert rows["cat"]["num_references"] == 2 and rows["cat"]["status"] == "ok"
    assert "not found" in rows["ghost"]["error"] and "subject id" in rows["../escape"]["error"]
    assert not storage.list_files(f"{s3_prefix}/escape")
    # A run killed before its manifest: the caches it wrote are found by their headers, not recomputed.
    for uri in storage.list_files(f"{out}/_manifests"):
        storage.delete(uri)
    resumed = run_caching(CachingJobConfig(out=out, model=model_uri, catalog=catalog_uri, batch_size=2))
    assert (resumed.computed, manifest(out)["cat"]["action"]) == (0, "skipped")


def test_unusable_inputs_fail_the_job_clearly(ray_cluster, model_uri, s3_prefix):
    storage.write_bytes(f"{s3_prefix}/catalog.xml", b"<x/>")
    with pytest.raises(JobInputError, match="unknown format"):
        run_caching(CachingJobConfig(out=f"{s3_prefix}/o", model=model_uri, catalog=f"{s3_prefix}/catalog.xml"))
    storage.write_bytes(f"{s3_prefix}/c.csv", b"id,uri\n1,2\n")
    with pytest.raises(JobInputError, match="lacks columns"):
        run_caching(CachingJobConfig(out=f"{s3_prefix}/o", model=model_uri, catalog=f"{s3_prefix}/c.csv"))
    with pytest.raises(JobInputError):
        CachingJobConfig(out="x", model="m")


def _cache_actor_processes() -> list[psutil.Process]:
    """The caching actors of this test session's own Ray (its raylet is a child of this process), not those of
    another Ray on the machine (a parallel test worker, a bench)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if "CacheActor" in cmdline and "MapWorker" in cmdline:
            found.append(proc)
    return found


def test_a_killed_actor_loses_no_subject(ray_cluster, model_uri, s3_prefix):
    refs, out = f"{s3_prefix}/refs", f"{s3_prefix}/out"
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "gray", "cyan", "navy", "olive"]
    for colour in colours:
        storage.write_bytes(f"{refs}/{colour}/1.png", png(colour))
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("summary", run_caching(
        CachingJobConfig(out=out, model=model_uri, images=refs, batch_size=1))))
    job.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and job.is_alive() and killed is None:
        written = [u for u in storage.list_files(out) if u.endswith(".safetensors")] if storage.list_files(out) else []
        actors = _cache_actor_processes()
        if written and actors:  # mid-job: some caches written, the actor still working
            killed = actors[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None, "the job finished before an actor could be killed"
    rows = manifest(out)
    assert set(rows) == set(colours) and all(r["status"] == "ok" for r in rows.values())
    assert result["summary"].computed + result["summary"].skipped == len(colours)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_node(bin_dir: Path, env: dict, temp_dir: str, log, *args: str) -> subprocess.Popen:
    """`ray start --block` with every listener on a port of its own (the session's local Ray holds the defaults;
    a dashboard agent on a default port would leave a cluster with "No available agent to submit job")."""
    own_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")]
    # --block keeps `ray start` in the foreground: stopping its process group stops this node only
    # (`ray stop` would also stop the test session's own local Ray).
    return subprocess.Popen([str(bin_dir / "ray"), "start", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", *own_ports, *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_cluster(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    """Stop this test's nodes and every process they started, and nothing else: a graceful `ray start` shutdown
    takes about 35 s here, and nothing of this cluster is kept. Each of its processes names the cluster's own
    temp dir on its command line (its session dir or socket paths), which no other Ray on the machine shares."""
    for node in nodes:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    deadline = time.time() + 30
    while left := [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]:
        assert time.time() < deadline, f"processes of the test cluster outlived it: {left}"
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        time.sleep(0.2)


def _alive_nodes(address: str) -> list[dict]:
    """The cluster's live nodes, from its dashboard's state API (the test process joins no cluster)."""
    from ray.util.state import list_nodes

    return [vars(n) for n in list_nodes(address=address, detail=True, raise_on_missing_output=False)
            if n.state == "ALIVE"]


def test_ray_job_submit_on_a_two_node_cluster(catalog, model_uri, s3_prefix):
    """A head and a worker node started with `ray start`, then `ray job submit` of the entrypoint, as on a real
    cluster: the caching actors need a custom resource only the worker node offers (how a job targets a node
    group), and every object goes through S3, so nothing depends on the driver's node or disk."""
    bin_dir = Path(sys.executable).parent
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the tests' and local runs' default) also forbids a second node on Linux:
    # this cluster sets it to 1, so its nodes register at the machine's own address (nothing leaves the machine).
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    log = open(os.path.join(temp_dir, "nodes.log"), "w")
    # What init_ray gives a local Ray (kernel.ray_runtime): idle workers kept between the job's Ray Data
    # executions, instead of restarted for each on these 2 cores.
    system_config = ["--system-config", json.dumps(local_system_config(2))]
    head = _ray_node(bin_dir, env, temp_dir, log, "--head", f"--port={gcs}", "--num-cpus=1",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                     f"--ray-client-server-port={_free_port()}", *system_config)
    nodes_started = [head]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while time.time() < deadline:
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(1)
        nodes_started.append(_ray_node(bin_dir, env, temp_dir, log, f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                                       '--resources={"caching_node": 1}'))
        while time.time() < deadline and len(_alive_nodes(address)) < 2:
            time.sleep(1)
        out = f"{s3_prefix}/job-out"
        command = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   "python", "jobs/cache_catalog.py", "--images", catalog, "--out", out, "--model", model_uri,
                   "--max-image-pixels", str(200 * 200), "--batch-size", "4",
                   "--actor-resources", '{"caching_node": 1}']
        for _ in range(30):  # the dashboard answers before the node's job agent has registered
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:] + open(log.name).read()[-2000:]
        assert "caching done: 2 computed" in submit.stdout
        assert manifest(out)["duo"]["status"] == "ok"
        # Two nodes, and the caching actors ran on the worker node, the one that offers their resource.
        nodes = _alive_nodes(address)
        assert len(nodes) == 2, nodes
        [worker_id] = [n["node_id"] for n in nodes if "caching_node" in (n.get("resources_total") or {})]
        assert not next(n for n in nodes if n["node_id"] == worker_id)["is_head_node"]
        actors = json.loads(subprocess.run([str(bin_dir / "ray"), "list", "actors", "--address", address, "--format",
                                            "json", "--detail", "--limit", "1000"], env=env, capture_output=True,
                                           text=True).stdout)
        placed = {a["node_id"] for a in actors if "CacheActor" in (a.get("class_name") or "")}
        assert placed == {worker_id}, (placed, worker_id)
    finally:
        _kill_cluster(nodes_started, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- the resume check, without Ray: what counts as "this cache is already in the store" ----------------------------
def _resume_row(tmp_path, blob: bytes | None, hashes: list[str]) -> dict:
    """A read-stage row as the plan makes it: ``stored_cache`` holds the size its listing found, or None."""
    uri = str(tmp_path / "s.safetensors")
    if blob is not None:
        storage.write_bytes(uri, blob)
    listed = {obj.uri: obj.size for obj in storage.list_objects(str(tmp_path))}
    return {"cache_uri": uri, "source_hashes": hashes,
            "stored_cache": json.dumps({"bytes": listed[uri]}) if uri in listed else None}


def test_resume_check_trusts_only_a_matching_dreamcache_header(tmp_path, tiny_pipe):
    import dataclasses
    from types import SimpleNamespace

    from safetensors.torch import save

    from pipelines.caching.stages import CacheActor, _stored_cache

    [cache] = tiny_pipe.build_caches([Image.new("RGB", (64, 64), "red")], ["h1"])
    config = CachingJobConfig(out=str(tmp_path), model="unused", images="unused")
    size = cache.info.resolution
    stored = _stored_cache(_resume_row(tmp_path, cache.to_bytes(), ["h1"]), config, size)
    assert json.loads(stored) == {"base_model": tiny_pipe.base_model, "bytes": len(cache.to_bytes())}

    # The actor compares the fingerprint: the same model skips, another model recomputes.
    for base_model, skipped in [(tiny_pipe.base_model, True), ("another-model", False)]:
        row = {"stored_cache": stored}
        actor = SimpleNamespace(pipe=SimpleNamespace(base_model=base_model))
        assert CacheActor._already_cached(actor, row) is skipped
        assert row.get("action") == ("skipped" if skipped else None)

    tensors = {k: v.contiguous() for k, v in cache.features.items()}
    not_ours = {**cache.info.to_metadata(), "format": "something-else"}
    cases = {
        "other sources": (cache.to_bytes(), ["h2"]),
        "other settings": (FeatureCache(cache.features, dataclasses.replace(cache.info, seed=7)).to_bytes(), ["h1"]),
        "other format version": (FeatureCache(cache.features, dataclasses.replace(cache.info, format_version="0"))
                                 .to_bytes(), ["h1"]),
        "foreign safetensors": (save(tensors, metadata=not_ours), ["h1"]),
        "header not an object": (len(b"[1]").to_bytes(8, "little") + b"[1]", ["h1"]),
        "truncated": (cache.to_bytes()[:20], ["h1"]),
        "cut short, header intact": (cache.to_bytes()[:-100], ["h1"]),
        "missing": (None, ["h1"]),
    }
    for name, (blob, hashes) in cases.items():
        assert _stored_cache(_resume_row(tmp_path / name.replace(" ", "-"), blob, hashes), config, size) is None, name
