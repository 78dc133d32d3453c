"""Batch generation (pipelines/generation.py, jobs/generate_batch.py).

Unit tests of the plan run without Ray. The end-to-end tests run the real job on the SeaweedFS server and the
session's local Ray with the tiny model: good subjects, a broken cache, a missing cache, a subject whose caching
failed and an unsafe id in one plan; then the incremental re-runs, the contact sheet and determinism.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamcache import storage
from dreamcache.cache_store import CacheStore
from pipelines.generation import contact_sheet
from pipelines.generation.sheets import settings_caption
from pipelines.generation import (
    CacheReader,
    GenerationJobConfig,
    RenderSettings,
    build_plan,
    load_prompts,
    parse_seeds,
    read_manifest,
    render_rows,
    run_generation,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
PROMPTS = ["a photo of a toy", "a toy on the beach"]


def caching_manifest_bytes(rows: list[dict]) -> bytes:
    """A manifest with the caching job's schema (the cross-team contract), written here so these tests do not
    depend on the caching job."""
    schema = pa.schema([
        ("subject_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("cache_uri", pa.string()),
        ("source_uris", pa.list_(pa.string())), ("source_hashes", pa.list_(pa.string())),
        ("num_references", pa.int32()), ("bytes", pa.int64()), ("base_model", pa.string()), ("action", pa.string()),
        ("run_id", pa.string()), ("read_s", pa.float64()), ("compute_s", pa.float64()), ("write_s", pa.float64()),
    ])
    full = [{"error": None, "source_uris": [], "source_hashes": [], "num_references": 1, "bytes": 0,
             "base_model": "", "action": "computed", "run_id": "test", "read_s": 0.0, "compute_s": 0.0,
             "write_s": 0.0, **row} for row in rows]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(full, schema=schema), buffer)
    return buffer.getvalue().to_pybytes()


def write_caches(pipe, root: str) -> dict[str, str]:
    """Two good subjects and a truncated cache file under ``root``; returns subject -> cache URI."""
    store = CacheStore(root)
    red, blue = pipe.build_caches([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")])
    uris = {"red": store.write("red", red)[0], "blue": store.write("blue", blue)[0]}
    storage.write_bytes(store.uri_for("broken"), red.to_bytes()[:1000])
    uris["broken"] = store.uri_for("broken")
    return uris


def config_for(model_dir: Path, **kw) -> GenerationJobConfig:
    defaults = dict(model=str(model_dir), adapter=str(model_dir / "adapter.safetensors"), seeds=[0, 1],
                    steps=STEPS, batch_size=4, contact_sheet_cell=64)
    return GenerationJobConfig(**{**defaults, **kw})


# =============================================================================================================
# The plan (no Ray)
# =============================================================================================================
def test_parse_seeds():
    assert parse_seeds("0,1") == [0, 1]
    assert parse_seeds("0-3, 10,2") == [0, 1, 2, 3, 10]
    for bad in ("", "a", "1.5", "-1", "0-x"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert len(parse_seeds("0-9999")) == 10_000
    with pytest.raises(ValueError, match="more than 10000 seeds per prompt"):
        parse_seeds("0-1000000000")  # refused at once, not expanded into a billion-item list


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# campaign\na photo of a toy\n\n  a toy on the beach  \na photo of a toy\n")
    specs = load_prompts(GenerationJobConfig("m", "a", "c", prompts=str(text), negative_prompt="blurry"))
    assert [s.prompt for s in specs] == PROMPTS  # comments, blanks and duplicates dropped, order kept
    assert {s.negative_prompt for s in specs} == {"blurry"} and {s.guidance_scale for s in specs} == {7.5}

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a toy", "negative_prompt": "red", "guidance_scale": 5}\n{"prompt": "a cat"}\n')
    first, second = load_prompts(GenerationJobConfig("m", "a", "c", prompts=str(jsonl), image_guidance_scale=3.0))
    assert (first.negative_prompt, first.guidance_scale, first.image_guidance_scale) == ("red", 5.0, 3.0)
    assert (second.negative_prompt, second.guidance_scale) == ("", 7.5)

    for content, message in [
        ('{"prompt": "a toy", "negative": "x"}\n', "line 1: unknown key"),
        ('{"prompt": "a toy"}\n{"prompt": \n', "line 2: not JSON"),
        ('{"prompt": ""}\n', "non-empty string"),
        ('{"prompt": "a", "guidance_scale": "high"}\n', "must be a number"),
        ("# nothing\n\n", "no prompts"),
    ]:
        jsonl.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(GenerationJobConfig("m", "a", "c", prompts=str(jsonl)))


def test_image_names_follow_every_parameter(tmp_path, tiny_model_dir):
    caches = tmp_path / "caches"
    caches.mkdir()
    for subject in ("a1", "b2"):
        (caches / f"{subject}.safetensors").write_bytes(b"not read when planning")
    base = config_for(tiny_model_dir, caches=str(caches), prompts=PROMPTS, out=str(tmp_path / "out"))

    def uris(config):
        return [row.image_uri for row in build_plan(config)]

    first = uris(base)
    assert len(first) == len(set(first)) == 2 * 2 * 2  # subjects x prompts x seeds
    assert first == uris(base)  # deterministic
    assert first[0].startswith(str(tmp_path / "out" / "a1" / "a-photo-of-a-toy-s0-"))
    # Adding a prompt or a seed keeps every existing name: only the new rows are new.
    assert set(first) < set(uris(config_for(tiny_model_dir, caches=str(caches), prompts=PROMPTS + ["a cat"],
                                            out=str(tmp_path / "out"))))
    assert set(first) < set(uris(config_for(tiny_model_dir, caches=str(caches), prompts=PROMPTS, seeds=[0, 1, 2],
                                            out=str(tmp_path / "out"))))
    # Any parameter that changes pixels changes every name.
    for change in [dict(steps=STEPS + 1), dict(guidance_scale=5.0), dict(image_guidance_scale=3.0),
                   dict(guidance="joint"), dict(negative_prompt="blurry"), dict(height=32), dict(dtype="fp16"),
                   dict(adapter=str(tmp_path / "other.safetensors"))]:
        changed = uris(config_for(tiny_model_dir, caches=str(caches), prompts=PROMPTS, out=str(tmp_path / "out"),
                                  **change))
        assert not set(changed) & set(first), change


def test_plan_from_caching_manifest_marks_unusable_subjects(tmp_path, tiny_model_dir):
    manifest = tmp_path / "caches" / "manifest.parquet"
    storage.write_bytes(str(manifest), caching_manifest_bytes([
        {"subject_id": "dog", "status": "ok", "cache_uri": str(tmp_path / "dog.safetensors"), "source_hashes": ["ab"]},
        {"subject_id": "cat", "status": "error", "error": "corrupt image", "cache_uri": None},
        {"subject_id": "bad id", "status": "ok", "cache_uri": str(tmp_path / "x.safetensors")},
    ]))
    config = config_for(tiny_model_dir, caches=str(manifest), prompts=["a toy"], seeds=[0], out=str(tmp_path / "o"))
    rows = {r.subject_id: r for r in build_plan(config)}
    assert set(rows) == {"dog", "cat", "bad id"}
    assert rows["dog"].error is None and rows["dog"].cache_uri == str(tmp_path / "dog.safetensors")
    assert rows["cat"].error == "caching failed: corrupt image"
    assert "bad id" in rows["bad id"].error and rows["bad id"].image_uri is None  # never becomes a path

    # A subject list: unknown and unsafe ids are error rows too, never paths.
    config.subjects = ["dog", "ghost", "a/../etc", "manifest.parquet"]
    rows = {r.subject_id: r for r in build_plan(config)}
    assert "no cache for subject 'ghost'" in rows["ghost"].error
    assert rows["a/../etc"].image_uri is None and "'..'" in rows["a/../etc"].error
    assert "reserved" in rows["manifest.parquet"].error

    # The reference hashes are part of the key: a recomputed cache (new references) renders anew.
    before = build_plan(config)[0].image_uri
    storage.write_bytes(str(manifest), caching_manifest_bytes([
        {"subject_id": "dog", "status": "ok", "cache_uri": str(tmp_path / "dog.safetensors"), "source_hashes": ["cd"]},
    ]))
    assert build_plan(config)[0].image_uri != before

    storage.write_bytes(str(manifest), b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        build_plan(config)


def test_explicit_plan_file(tmp_path, tiny_model_dir):
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "dog.safetensors").write_bytes(b"x")
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"subject_id": "dog", "prompt": "a dog", "seed": 7}\n'
                    '{"subject_id": "dog", "prompt": "a dog in snow", "guidance_scale": 3}\n')
    config = config_for(tiny_model_dir, caches=str(tmp_path / "caches"), plan=str(plan), seeds=[0, 1],
                        out=str(tmp_path / "o"))
    rows = build_plan(config)
    assert [(r.prompt.prompt, r.seed, r.prompt.guidance_scale) for r in rows] == [
        ("a dog", 7, 7.5), ("a dog in snow", 0, 3.0), ("a dog in snow", 1, 3.0)]  # no seed: the job's seeds
    # The same plan as Parquet and CSV (cells left empty: the job's defaults), read by the same readers.
    table = pa.table({"subject_id": ["dog", "dog"], "prompt": ["a dog", "a dog in snow"], "seed": [7, None],
                      "guidance_scale": [None, 3.0]})
    pq.write_table(table, tmp_path / "plan.parquet")
    (tmp_path / "plan.csv").write_text("subject_id,prompt,seed,guidance_scale\ndog,a dog,7,\ndog,a dog in snow,,3\n")
    for other in ("plan.parquet", "plan.csv"):
        again = build_plan(replace(config, plan=str(tmp_path / other)))
        assert [(r.row_key, r.prompt_index) for r in again] == [(r.row_key, r.prompt_index) for r in rows], other

    plan.write_text('{"subject": "dog", "prompt": "a dog"}\n')
    with pytest.raises(ValueError, match="line 1: unknown key"):
        build_plan(config)
    plan.write_bytes(b'{"subject_id": "dog", "prompt": "a dog"}\n{"subject_id": "dog", "prompt": "a \xff"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8"):  # never a prompt with a replacement character
        build_plan(config)
    # What the driver checks at once, in one line: the file's head.
    for name, content, message in [("empty.jsonl", "# nothing\n", "has no rows"),
                                   ("extra.csv", "subject_id,prompt,colour\ndog,a,red\n", "unknown column"),
                                   ("nosubject.csv", "prompt\na dog\n", "'subject_id' is required")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            build_plan(replace(config, plan=str(tmp_path / name)))
    with pytest.raises(storage.ObjectNotFound, match="plan file not found"):
        build_plan(replace(config, plan=str(tmp_path / "missing.jsonl")))


def test_render_rows_reads_each_cache_once_per_batch(tmp_path, tiny_pipe):
    caches = write_caches(tiny_pipe, str(tmp_path / "caches"))
    config = config_for(Path("unused"), caches=str(tmp_path / "caches"), prompts=PROMPTS, seeds=[0],
                        out=str(tmp_path / "out"))
    rows = [r.record() for r in build_plan(config)]
    assert {r["subject_id"] for r in rows} == {"red", "blue", "broken"} and len(rows) == 6
    settings = RenderSettings(model="", adapter="", device="cpu", dtype="fp32", steps=1, guidance="compositional",
                              height=None, width=None)
    reader = CacheReader(tiny_pipe.load_cache, size=8)
    results = render_rows(tiny_pipe, rows, settings, reader)

    assert reader.reads == 2  # red and blue once each for four rows; the broken one failed
    assert [r["plan_index"] for r in results] == [r["plan_index"] for r in rows]
    by_subject = {(r["subject_id"], r["prompt_index"]): r for r in results}
    for subject in ("red", "blue"):
        for p in (0, 1):
            row = by_subject[(subject, p)]
            assert (row["status"], row["action"], row["error"]) == ("ok", "rendered", None)
            image = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
            assert image.size == (64, 64) and json.loads(image.text["dreamcache"])["subject_id"] == subject
            assert row["bytes"] == storage.size(row["image_uri"])
    broken = by_subject[("broken", 0)]
    assert broken["status"] == "error" and broken["image_uri"] is None
    assert "cache unusable" in broken["error"] and caches["broken"] in broken["error"]

    again = render_rows(tiny_pipe, rows[:1], settings, reader)
    assert again[0]["status"] == "ok" and reader.reads == 2  # a later batch of the same subject reuses it


def test_job_reports_bad_input_with_exit_code_2(tmp_path, tiny_model_dir, capsys):
    from jobs.generate_batch import main

    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "dog.safetensors").write_bytes(b"x")
    (tmp_path / "p.txt").write_text("a dog\n")
    common = ["--adapter", str(tiny_model_dir / "adapter.safetensors"), "--caches", str(tmp_path / "caches"),
              "--out", str(tmp_path / "out")]
    cases = [
        (["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt")], "no unet/config.json"),
        (["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "p.txt"), "--steps", "0"], "steps must be"),
        (["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "p.txt"), "--seeds", "x"], "bad seed list"),
    ]
    for argv, message in cases:
        assert main(common + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("generate_batch: error:") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written for a refused job


def test_job_script_runs_from_the_repo_root():
    """What `ray job submit --working-dir . -- python jobs/generate_batch.py` runs, without installing."""
    done = subprocess.run([sys.executable, "jobs/generate_batch.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--caches" in done.stdout and "--prompts" in done.stdout


# =============================================================================================================
# End to end: SeaweedFS S3 + local Ray
# =============================================================================================================
@pytest.fixture(scope="module")
def first_run(s3_server, ray_cluster, tiny_pipe, tiny_model_dir):
    """Run 1 through the job's own entrypoint, on S3: 2 good subjects, a broken cache, a cache the manifest
    names but that is missing, a subject whose caching failed, an unsafe id."""
    from jobs.generate_batch import main

    root = f"s3://{s3_server.bucket}/generation-{uuid.uuid4().hex[:10]}"
    caches = write_caches(tiny_pipe, f"{root}/caches")
    manifest = f"{root}/caches/manifest.parquet"
    reference = f"{root}/references/red/ref.png"  # the contact sheet shows it at the head of red's grid
    storage.write_bytes(reference, contact_sheet.png_bytes(Image.radial_gradient("L").convert("RGB").resize((48, 40))))
    storage.write_bytes(manifest, caching_manifest_bytes([
        {"subject_id": "red", "status": "ok", "cache_uri": caches["red"], "source_hashes": ["r"],
         "source_uris": [reference]},
        {"subject_id": "blue", "status": "ok", "cache_uri": caches["blue"], "source_hashes": ["b"]},
        {"subject_id": "broken", "status": "ok", "cache_uri": caches["broken"]},
        {"subject_id": "ghost", "status": "ok", "cache_uri": f"{root}/caches/ghost.safetensors"},
        {"subject_id": "failed", "status": "error", "error": "image is not a JPEG", "cache_uri": None},
        {"subject_id": "bad id", "status": "ok", "cache_uri": caches["red"]},
    ]))
    prompts = f"{root}/prompts.jsonl"
    storage.write_bytes(prompts, "".join(json.dumps(p) + "\n" for p in [
        {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "negative_prompt": "blurry", "guidance_scale": 5.0},
    ]).encode())
    out = f"{root}/out"
    argv = ["--model", str(tiny_model_dir), "--adapter", str(tiny_model_dir / "adapter.safetensors"),
            "--caches", manifest, "--prompts", prompts, "--seeds", "0,1", "--out", out, "--steps", str(STEPS),
            "--batch-size", "4", "--contact-sheet-cell", "64", "--summary-json", f"{root}/summary.json", "-q"]
    assert main(argv) == 0
    summary = json.loads(storage.read_bytes(f"{root}/summary.json"))
    config = config_for(tiny_model_dir, caches=manifest, prompts=prompts, out=out)
    return {"root": root, "out": out, "config": config, "summary": summary, "caches": caches, "reference": reference}


def ok_rows(manifest: list[dict]) -> dict[str, dict]:
    return {r["row_key"]: r for r in manifest if r["status"] == "ok"}


def test_first_run_renders_good_rows_and_reports_bad_ones(first_run):
    summary = first_run["summary"]
    assert (summary["planned"], summary["rendered"], summary["skipped"], summary["failed"]) == (24, 8, 0, 16)
    manifest = read_manifest(summary["run_manifest_uri"])
    assert len({r["row_key"] for r in manifest}) == 24  # every plan row once

    for row in manifest:
        if row["subject_id"] in ("red", "blue"):
            assert (row["status"], row["action"], row["error"]) == ("ok", "rendered", None)
            assert row["image_uri"].startswith(f"{first_run['out']}/{row['subject_id']}/")
            image = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
            assert image.size == (64, 64)
            parameters = json.loads(image.text["dreamcache"])
            assert (parameters["prompt"], parameters["seed"]) == (row["prompt"], row["seed"])
            assert row["generate_s"] > 0 and row["bytes"] > 0 and row["run_id"] == summary["run_id"]
        else:
            assert (row["status"], row["action"], row["image_uri"]) == ("error", "failed", None)
    errors = {r["subject_id"]: r["error"] for r in manifest if r["status"] == "error"}
    assert "not a readable cache file" in errors["broken"]
    assert "not found" in errors["ghost"] and "ghost.safetensors" in errors["ghost"]
    assert errors["failed"] == "caching failed: image is not a JPEG"
    assert "bad id" in errors["bad id"] and "contains ' '" in errors["bad id"]
    beach = [r for r in manifest if r["prompt"] == PROMPTS[1]]
    assert {(r["negative_prompt"], r["guidance_scale"]) for r in beach} == {("blurry", 5.0)}
    # Nothing outside the subjects' folders, the manifest and the run's folder.
    top = {uri[len(first_run["out"]) + 1:].split("/")[0] for uri in storage.list_files(first_run["out"])}
    assert top == {"red", "blue", "_manifests", "_runs"}


def test_contact_sheet_shows_prompts_across_and_seeds_down(first_run):
    summary = first_run["summary"]
    index_uri = summary["contact_sheet_uri"]
    assert index_uri == f"{first_run['out']}/_runs/{summary['run_id']}/index.html"
    page = storage.read_bytes(index_uri).decode()
    for subject in ("red", "blue", "broken", "ghost", "failed"):
        assert f"href='sheets/{subject}.png'" in page
    assert "bad id" in page and "(not drawn)" in page  # listed, but never a file name
    assert "a toy on the beach" in page and "image is not a JPEG" in page

    manifest = [r for r in read_manifest(summary["run_manifest_uri"]) if r["subject_id"] == "red"]
    sheet_uri = index_uri.rsplit("/", 1)[0] + "/sheets/red.png"
    sheet = Image.open(io.BytesIO(storage.read_bytes(sheet_uri))).convert("RGB")
    # Under the title, a band of settings lines: the sheet is that many lines taller than a bare grid.
    bare = contact_sheet.SheetLayout(columns=2, rows=2, cell=64)
    extra = sheet.height - bare.size[1]
    assert sheet.width == bare.size[0] and extra >= 3 * bare.line_height and extra % bare.line_height == 0
    layout = contact_sheet.SheetLayout(columns=2, rows=2, cell=64, caption_lines=extra // bare.line_height)
    band = sheet.crop((0, layout.title_height, sheet.width, layout.grid_top - layout.header_height))
    assert min(band.convert("L").getdata()) < 100  # text is drawn there
    # The head of the grid is the subject's reference, as the caching manifest names it.
    reference = contact_sheet.fit_to_cell(contact_sheet.load_image(first_run["reference"]), 64)
    assert sheet.crop(layout.reference_box()).tobytes() == reference.tobytes()
    for row in manifest:
        column, line = row["prompt_index"], row["seed"]  # prompts 0/1 across, seeds 0/1 down
        expected = contact_sheet.fit_to_cell(Image.open(io.BytesIO(storage.read_bytes(row["image_uri"]))), 64)
        assert sheet.crop(layout.image_box(column, line)).tobytes() == expected.tobytes(), (column, line)
    broken = Image.open(io.BytesIO(storage.read_bytes(sheet_uri.replace("red.png", "broken.png")))).convert("RGB")
    assert broken.getpixel(layout.image_box(1, 1)[:2]) == contact_sheet.ERROR_FILL
    assert broken.getpixel(layout.reference_box()[:2]) == contact_sheet.MISSING_FILL  # its manifest row names none


def test_sheet_caption_names_the_run_settings(tmp_path, tiny_model_dir):
    config = config_for(tiny_model_dir, caches=str(tmp_path), prompts=PROMPTS, guidance="joint")
    caption = "\n".join(settings_caption(config, {7.5, 5.0}, {0.4}))
    for text in (f"model: {tiny_model_dir}", f"adapter: {tiny_model_dir / 'adapter.safetensors'}",
                 f"steps: {STEPS}", "guidance: joint", "text scale s_T: 5-7.5 (per prompt)", "image scale s_I: 0.4"):
        assert text in caption
    # Wrapped to the sheet: at spaces, and inside a word longer than a line.
    lines = contact_sheet.wrap_text("ab cd " + "x" * 25, 10, len)
    assert lines == ["ab cd", "x" * 10, "x" * 10, "x" * 5]


def test_rerun_renders_only_what_is_new(first_run, tiny_model_dir):
    before = read_manifest(first_run["summary"]["run_manifest_uri"])
    images = {r["image_uri"]: storage.read_bytes(r["image_uri"]) for r in before if r["status"] == "ok"}

    # Same plan for the good subjects: nothing to render, so no actor and no Ray work at all.
    again = run_generation(config_for(tiny_model_dir, caches=first_run["config"].caches, out=first_run["out"],
                                      prompts=first_run["config"].prompts, subjects=["red", "blue"]))
    assert (again.planned, again.rendered, again.skipped, again.failed) == (8, 0, 8, 0)
    assert again.render_s == 0
    assert {r["image_uri"] for r in read_manifest(again.manifest_uri) if r["status"] == "ok"} == set(images)
    assert again.kept == 16  # the other subjects' rows of run 1 stay in the published version

    # One more prompt for every subject: only its rows are rendered; failed rows are tried (and fail) again.
    prompts = f"{first_run['root']}/prompts-2.jsonl"
    storage.write_bytes(prompts, storage.read_bytes(first_run["config"].prompts) + b'{"prompt": "a toy in the snow"}\n')
    more = run_generation(config_for(tiny_model_dir, caches=first_run["config"].caches, out=first_run["out"],
                                     prompts=prompts))
    assert (more.planned, more.rendered, more.skipped, more.failed) == (36, 4, 8, 24)
    manifest = sorted(read_manifest(more.manifest_uri), key=lambda r: r["row_key"])
    # This run planned every row the earlier ones did: the published version is exactly this run's rows.
    assert manifest == sorted(read_manifest(more.run_manifest_uri), key=lambda r: r["row_key"]) and more.kept == 0
    assert {r["prompt"] for r in manifest if r["action"] == "rendered"} == {"a toy in the snow"}
    assert {r["image_uri"] for r in manifest if r["action"] == "skipped"} == set(images)
    for uri, data in images.items():
        assert storage.read_bytes(uri) == data  # never rewritten
    page = storage.read_bytes(more.contact_sheet_uri).decode()
    assert "sheets/red.png" in page and "rendered: 4" in page


def test_same_row_gives_the_same_bytes(first_run, tmp_path):
    """The run-1 plan rendered again into another prefix: every image identical, byte for byte."""
    summary = run_generation(replace(first_run["config"], out=str(tmp_path / "again"), contact_sheet="none"))
    assert summary.rendered == 8 and summary.contact_sheet_uri is None
    first = ok_rows(read_manifest(first_run["summary"]["run_manifest_uri"]))
    second = ok_rows(read_manifest(summary.manifest_uri))
    assert set(first) == set(second) and len(first) == 8
    for key, row in first.items():
        assert row["image_uri"].rsplit("/", 2)[1:] == second[key]["image_uri"].rsplit("/", 2)[1:]
        assert storage.read_bytes(row["image_uri"]) == storage.read_bytes(second[key]["image_uri"]), key


def test_explicit_plan_is_checked_in_the_cluster_each_bad_row_an_error_row(s3_server, ray_cluster, tiny_model_dir,
                                                                         tmp_path):
    """A plan file on S3 is read and checked by Ray tasks: a row that cannot be read is one error row with its
    line and reason (the job goes on), under the same key on the next run."""
    (tmp_path / "caches").mkdir()
    plan = f"s3://{s3_server.bucket}/plan-{uuid.uuid4().hex[:10]}/plan.jsonl"
    storage.write_bytes(plan, ("\n".join([
        '{"subject_id": "ghost", "prompt": "a dog"}',  # 1: two rows (seeds 0, 1), no cache for ghost
        '{"subject_id": "ghost", "prompt": "a dog"}',  # 2: the same rows again: dropped
        "# a comment",
        "not json",
        '{"subject_id": "ghost", "promt": "a typo"}',
        '{"subject_id": "a/../b", "prompt": "x", "seed": 1}',
        '{"subject_id": "ghost", "prompt": "x", "seed": -1}',
        "[1, 2]",
    ]) + "\n").encode())
    config = config_for(tiny_model_dir, caches=str(tmp_path / "caches"), plan=plan, out=str(tmp_path / "out"))
    summary = run_generation(config)
    assert (summary.planned, summary.rendered, summary.failed) == (7, 0, 7)
    rows = read_manifest(summary.manifest_uri)
    assert all(r["status"] == "error" and r["image_uri"] is None for r in rows)
    ghost = [r for r in rows if r["error"].startswith("no cache for subject 'ghost'")]
    assert sorted(r["seed"] for r in ghost) == [0, 1]
    unreadable = {int(r["error"].split(" line ", 1)[1].split(":")[0]): r for r in rows
                  if r["error"].startswith(f"{plan} line ")}
    assert sorted(unreadable) == [4, 5, 7, 8], [r["error"] for r in rows]
    assert "not JSON" in unreadable[4]["error"] and unreadable[4]["subject_id"] == ""
    assert "unknown key(s) ['promt']" in unreadable[5]["error"] and unreadable[5]["subject_id"] == "ghost"
    assert "seed must be an integer" in unreadable[7]["error"]
    assert "expected a JSON object, got list" in unreadable[8]["error"]
    assert "'..'" in next(r["error"] for r in rows if r["subject_id"] == "a/../b")
    assert "ghost" in storage.read_bytes(summary.contact_sheet_uri).decode()

    again = run_generation(config)
    assert again.planned == 7 and again.kept == 0  # the same keys: this run's rows replace the last run's
    assert len(read_manifest(again.manifest_uri)) == 7


def test_recaching_with_other_settings_renames_the_images(tmp_path):
    """A subject re-cached with another cache prompt (same model, same images) must be re-rendered: its images'
    names carry what the cache was made from, caching settings included."""
    from pipelines.generation.plan import _caching_manifest_subjects

    def version(settings: str) -> str:
        uri = str(tmp_path / f"{uuid.uuid4().hex}.parquet")
        row = {"subject_id": "s", "status": "ok", "cache_uri": "x.safetensors", "source_hashes": ["h"],
               "base_model": "m", "settings": settings}
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([row]), buffer)
        storage.write_bytes(uri, buffer.getvalue())
        [subject] = _caching_manifest_subjects(uri)
        return subject.cache_version

    assert version('{"cache_prompt": ""}') == version('{"cache_prompt": ""}')
    assert version('{"cache_prompt": ""}') != version('{"cache_prompt": "blurry"}')
