"""Issue 11: one bad-input contract for every entry point. Each case of the corpus (``bad_inputs.py``) runs through
every entry point that takes its kind: the CLI (exit 2, exactly one ``dreamcache: error:`` line, no traceback),
Serve (the 4xx, naming the field or file) and the Ray Data jobs (one error row per case with its reason, the job
itself succeeding: one caching and one generation job hold every case at once). Then the outputs that must
describe themselves (PNG text chunks, file names) and the one command-line vocabulary."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from bad_inputs import CASES, TEST_IMAGE_PIXELS, Case, Materials, cases
from manifests import manifest_rows, manifest_table
from PIL import Image

# Kinds whose inputs the job tests make themselves (on S3, with the job's materials).
JOB_KINDS = ("image", "image_uri", "subject_id", "folder", "serve_cli")


@pytest.fixture(scope="module")
def materials(tmp_path_factory, tiny_pipe, tiny_model_dir) -> Materials:
    from serve_fixtures import reference_png

    image = Image.open(io.BytesIO(reference_png(5)))
    cache = tiny_pipe.cache_subject([image], subject_id="good", source_hashes=["0" * 64])
    return Materials(tmp_path_factory.mktemp("bad-inputs"), tiny_model_dir, cache.to_bytes())


@pytest.fixture(scope="module")
def made(materials) -> dict[str, str]:
    """Every case's input but the jobs' ones, made once."""
    return {case.name: case.make(materials) for case in CASES if case.kind not in JOB_KINDS}


@pytest.fixture(scope="module")
def job_materials(materials, s3_server) -> Materials:
    return materials._replace(s3_prefix=f"s3://{s3_server.bucket}/bad-inputs-{uuid.uuid4().hex[:8]}")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from pipelines.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dreamcache: error: "), err
    assert "Traceback" not in err and expected in lines[0], err


def _generate_argv(materials: Materials, tmp: Path, model: str | None = None, adapter: str | None = None,
                   cache: str | None = None, prompt: str = "a photo") -> list[str]:
    good_cache = tmp / "good.safetensors"
    if not good_cache.exists():
        good_cache.write_bytes(materials.good_cache)
    return ["generate", "--model", model or str(materials.model_dir),
            "--adapter", adapter or str(materials.model_dir / "adapter.safetensors"),
            "--cache", cache or str(good_cache), "--prompt", prompt, "--steps", "1", "--height", "64", "--width", "64",
            "--out", str(tmp / "out")]


# -- the CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases("cache", "adapter", "model", "checkpoint", entry="cli"), ids=lambda c: c.name)
def test_cli_refuses_bad_input_with_exit_2_and_one_line(case: Case, materials, made, tmp_path, capsys):
    given = made[case.name]
    if case.kind == "checkpoint":
        argv = ["convert-official", given, str(tmp_path / "adapter.safetensors")]
    else:
        argv = _generate_argv(materials, tmp_path, **{case.kind: given})
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, case.cli)
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err


# -- `dreamcache serve`: refused before it deploys ------------------------------------------------------------------
@pytest.mark.parametrize("case", cases("serve_cli", entry="serve_cli"), ids=lambda c: c.name)
def test_serve_cli_refuses_bad_options_before_deploying(case: Case, materials, ray_cluster, monkeypatch, capsys):
    import torch

    import pipelines.serve.app

    argv = case.make(materials)
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA torch: --device cuda is fine here")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session's local Ray, as `dreamcache serve` starts one
    monkeypatch.setattr(pipelines.serve.app, "run_local", lambda *a, **k: pytest.fail(f"{case.name} deployed"))
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, case.serve_cli)


# The serve CLI cases about the app's inputs (not the port, device or cluster, which only the CLI binds or sees).
DEPLOY_CASES = [c for c in cases("serve_cli", entry="serve_cli") if c.name.startswith(("serve-model", "serve-adapter",
                                                                                         "serve-caches"))]


@pytest.mark.parametrize("case", DEPLOY_CASES, ids=lambda c: c.name)
def test_the_app_builder_refuses_bad_inputs_as_serve_deploy_and_kuberay_call_it(case: Case, materials):
    """`serve deploy` and a RayService call ``pipelines.serve:build_app`` with the config's args, not the CLI: the
    same one-line error fails the deploy there, before any replica starts."""
    from dreamcache.cli import build_parser, user_errors
    from pipelines.cli import add_ray_commands, serve_app_args
    from pipelines.serve import build_app

    app_args = serve_app_args(build_parser(add_ray_commands).parse_args(case.make(materials)))
    with pytest.raises(user_errors()) as failed:  # what the CLI would print as its one line
        build_app(app_args)
    assert case.serve_cli in str(failed.value) and "\n" not in str(failed.value)


# -- Serve (the shared test apps; the auth app keeps its caches on S3, as a deployment does) -------------------------
def _place_cache(api, case: Case, made) -> str:
    from dreamcache import storage

    subject = f"{case.name}-{uuid.uuid4().hex[:6]}"
    storage.write_bytes(f"{api.caches}/{subject}.safetensors", Path(made[case.name]).read_bytes())
    return subject


def test_serve_answers_bad_input_with_its_4xx_naming_the_field(auth_api, made):
    """Every case and entry point is tried, and all mismatches are reported at once."""
    generate = {"prompt": "x", "steps": 1, "height": 64, "width": 64}
    wrong = []
    with auth_api.client() as client:
        for case in cases("cache", "generate_body"):
            if case.kind == "generate_body":
                tries = [(case.generate, case.generate.names, client.post(
                    "/v1/generate", content=made[case.name], headers={"content-type": "application/json"}))]
            else:
                subject = _place_cache(auth_api, case, made)
                tries = [(expected, expected.names.replace(case.name, subject), call()) for expected, call in (
                    (case.subject, lambda: client.get(f"/v1/subjects/{subject}")),
                    (case.generate, lambda: client.post("/v1/generate", json={"subject_id": subject, **generate})),
                ) if expected is not None]
            for expected, names, got in tries:
                if got.status_code != expected.status or names not in got.text:
                    wrong.append(f"{case.name} {got.request.url.path}: {got.status_code} {got.text[:120]}")
    assert not wrong, "\n".join(wrong)


def test_serve_png_carries_its_parameters(open_api, materials):
    subject = f"png-{uuid.uuid4().hex[:6]}"
    Path(open_api.caches).mkdir(parents=True, exist_ok=True)
    (Path(open_api.caches) / f"{subject}.safetensors").write_bytes(materials.good_cache)
    with open_api.client() as client:
        answer = client.post("/v1/generate", headers={"accept": "image/png"},
                             json={"subject_id": subject, "prompt": "a red dog", "negative_prompt": "blur", "seed": 7,
                                   "steps": 1, "height": 64, "width": 64, "guidance": "joint"})
    assert answer.status_code == 200, answer.text
    text = Image.open(io.BytesIO(answer.content)).text
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["guidance"]) == ("a red dog", "blur", "7", "joint")
    assert {"guidance_scale", "image_guidance_scale", "steps", "model_fingerprint", "cache_fingerprint"} <= set(text)


# -- the Ray Data jobs: one job each for all their cases ----------------------------------------------------------
def _mismatches(case: Case, expected: str, errors: list[str | None]) -> list[str]:
    """Why the rows of ``case`` do not say ``expected`` ([] when each one does)."""
    if not errors:
        return [f"{case.name}: no manifest row"]
    return [f"{case.name}: {error!r}" for error in errors if error is None or expected not in error]


def test_caching_job_gives_each_bad_catalog_row_its_error_row(ray_cluster, job_materials):
    from serve_fixtures import reference_png

    from dreamcache import storage
    from pipelines.caching import CachingJobConfig, run_caching

    ctx = job_materials
    good = f"{ctx.s3_prefix}/refs/good/1.png"
    storage.write_bytes(good, reference_png(3))
    lines, subject_of = [{"subject_id": "good", "image_uri": good}], {}
    for case in cases("image", "image_uri", "subject_id", entry="caching"):
        given = case.make(ctx)
        if case.kind == "image":  # uploaded beside the good reference, under the case's name
            uri = f"{ctx.s3_prefix}/refs/{case.name}/{Path(given).name}"
            storage.write_bytes(uri, Path(given).read_bytes())
            line = {"subject_id": case.name, "image_uri": uri}
        elif case.kind == "image_uri":
            line = {"subject_id": case.name, "image_uri": given}
        else:
            line = {"subject_id": given, "image_uri": good}
        lines.append(line)
        subject_of[case.name] = line["subject_id"]
    catalog = f"{ctx.s3_prefix}/catalog.jsonl"
    storage.write_bytes(catalog, "".join(json.dumps(line) + "\n" for line in lines).encode())
    out = f"{ctx.s3_prefix}/caches"
    summary = run_caching(CachingJobConfig(out=out, model=str(ctx.model_dir), catalog=catalog, batch_size=4,
                                           max_image_pixels=TEST_IMAGE_PIXELS))
    rows = manifest_rows(out, "caching")
    assert rows["good"]["status"] == "ok" and summary.computed == 1, rows["good"]
    wrong = [m for case in cases("image", "image_uri", "subject_id", entry="caching")
             for m in _mismatches(case, case.caching, [rows[subject_of[case.name]]["error"]]
                                  if subject_of[case.name] in rows else [])]
    assert not wrong, "\n".join(wrong)
    assert len(rows) == summary.errors + 1 == len(lines)  # one row per subject, none dropped
    assert all(rows[s]["cache_uri"] is None for s in subject_of.values())
    assert set(storage.list_files(ctx.s3_prefix)) <= {*storage.list_files(f"{ctx.s3_prefix}/refs"), catalog,
                                                      *storage.list_files(out)}  # no cache escaped its folder


def test_generation_job_gives_each_bad_subject_its_error_rows(ray_cluster, job_materials, made, tmp_path):
    from pipelines.generation import GenerationJobConfig, run_generation

    ctx = job_materials
    caches = tmp_path / "caches"
    caches.mkdir()
    (caches / "good.safetensors").write_bytes(ctx.good_cache)
    subject_of = {}
    for case in cases("cache", "subject_id", entry="generation"):
        if case.kind == "cache":  # the bad file in the cache folder under the case's name
            (caches / f"{case.name}.safetensors").write_bytes(Path(made[case.name]).read_bytes())
            subject_of[case.name] = case.name
        else:
            subject_of[case.name] = case.make(ctx)
    out = tmp_path / "out"
    summary = run_generation(GenerationJobConfig(
        model=str(ctx.model_dir), adapter=str(ctx.model_dir / "adapter.safetensors"), caches=str(caches),
        out=str(out), prompts=["a photo"], subjects=["good", *subject_of.values()], steps=1, height=64, width=64,
        contact_sheet="none"))
    rows = manifest_table(str(out), "generation").to_pylist()
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject_id"], []).append(row)
    assert [r["status"] for r in by_subject["good"]] == ["ok"] and summary.rendered == 1, by_subject.get("good")
    wrong = [m for case in cases("cache", "subject_id", entry="generation")
             for m in _mismatches(case, case.generation, [r["error"] for r in by_subject.get(subject_of[case.name], [])])]
    assert not wrong, "\n".join(wrong)
    assert summary.failed == len(subject_of) and all(r["image_uri"] is None for r in rows if r["status"] == "error")
    assert {p.name for p in out.iterdir()} - {"_manifests", "_runs"} == {"good"}  # no image path from a bad id


# -- JSON image URIs: an explicit allow-list, and no existence oracle ------------------------------------------------
def test_image_uris_are_off_by_default_and_missing_bucket_and_key_read_alike(s3_server, s3_prefix):
    from dreamcache import storage
    from pipelines.serve.app import read_image_uri
    from pipelines.serve.schema import Failure
    from pipelines.serve.settings import ServeSettings

    default = ServeSettings(model="m", caches="c")
    assert default.allowed_image_prefixes == ()
    refused = read_image_uri(f"{s3_prefix}/a.png", "image_uris.0", default)
    assert isinstance(refused, Failure) and (refused.status, refused.field) == (422, "image_uris.0")

    uploads = ServeSettings(model="m", caches="c", allowed_image_prefixes=(f"{s3_prefix}/uploads/",))
    outside = read_image_uri(f"{s3_prefix}/caches/a.png", "image_uris.0", uploads)
    assert isinstance(outside, Failure) and outside.status == 422
    storage.write_bytes(f"{s3_prefix}/uploads/a.png", b"png")
    assert read_image_uri(f"{s3_prefix}/uploads/a.png", "image_uris.0", uploads).data == b"png"

    anywhere = ServeSettings(model="m", caches="c", allowed_image_prefixes=("s3://",))
    missing_key = read_image_uri(f"{s3_prefix}/uploads/missing.png", "f", anywhere)
    missing_bucket = read_image_uri(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/a.png", "f", anywhere)
    assert isinstance(missing_key, Failure) and isinstance(missing_bucket, Failure)
    assert (missing_key.status, missing_key.message) == (missing_bucket.status, missing_bucket.message) == (
        422, missing_key.message)


# -- outputs that describe themselves; one vocabulary -----------------------------------------------------------------
def test_cli_generate_names_images_by_their_parameters_and_tags_them(materials, tmp_path, capsys):
    first = run_cli(_generate_argv(materials, tmp_path, prompt="a dog"), capsys)
    second = run_cli(_generate_argv(materials, tmp_path, prompt="a cat"), capsys)
    assert first[0] == second[0] == 0, first[2] + second[2]
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert len(paths) == 2, paths  # the second run did not overwrite the first
    text = Image.open(paths[0]).text
    assert {"prompt", "seed", "guidance_scale", "image_guidance_scale", "steps", "guidance", "model_fingerprint",
            "cache_fingerprint"} <= set(text)
    assert json.loads(text["dreamcache"])["prompt"] in ("a dog", "a cat")


def test_batch_job_png_uses_the_shared_writer():
    from dreamcache.image_files import image_name as shared_name
    from pipelines.generation.plan import image_name
    from pipelines.generation.render import encode_png

    assert image_name is shared_name
    parameters = json.dumps({"prompt": "p", "seed": 1, "cache_version": "abc", "guidance": "joint"}, sort_keys=True)
    text = Image.open(io.BytesIO(encode_png(Image.new("RGB", (8, 8)), parameters, "fp"))).text
    assert (text["dreamcache"], text["cache_fingerprint"], text["model_fingerprint"]) == (parameters, "abc", "fp")


def test_guidance_means_the_mode_in_every_command_and_version(capsys):
    import argparse

    from dreamcache import cli
    from pipelines.cli import add_ray_commands

    parser = cli.build_parser(add_ray_commands)
    batch = parser.parse_args(["generate-batch", "--model", "m", "--adapter", "a", "--caches", "c", "--prompts", "p",
                               "--guidance", "joint", "--guidance-scale", "3"])
    assert (batch.guidance, batch.guidance_scale) == ("joint", 3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate-batch", "--model", "m", "--adapter", "a", "--caches", "c", "--prompts", "p",
                           "--guidance", "3"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("dreamcache ")
    assert isinstance(parser, argparse.ArgumentParser)
