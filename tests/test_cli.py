"""The command line end to end on the tiny model, and its bad-input contract (exit 2, one line, no traceback)."""

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamcache.cli import main
from dreamcache.convert import official_key_shapes


def png(path, colour="red", size=(64, 64)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, fragment):
    code, _, err = result
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("dreamcache: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


def test_cache_then_generate(tmp_path, capsys, tiny_model_dir):
    model, adapter = tiny_model_dir, tiny_model_dir / "adapter.safetensors"
    a, b = png(tmp_path / "dog.png"), png(tmp_path / "dog2.png", "blue")
    code, out, err = run_cli(capsys, "cache", "--model", model, "--out", tmp_path / "caches", a, b)
    assert code == 0, err
    assert (tmp_path / "caches" / "dog.safetensors").is_file() and (tmp_path / "caches" / "dog2.safetensors").is_file()
    code, out, err = run_cli(capsys, "cache", "--model", model, "--out", tmp_path / "caches", "--subject-id", "both", a, b)
    assert code == 0 and "2 reference(s)" in out, err
    code, out, err = run_cli(capsys, "generate", "--model", model, "--adapter", adapter, "--cache",
                             tmp_path / "caches" / "both.safetensors", "--prompt", "a dog", "--prompt", "a cat",
                             "--num-images", "2", "--steps", "2", "--out", tmp_path / "img")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "img").iterdir())
    # Named from subject, prompt, seed and a hash of every setting (two samples of a prompt differ by their index).
    assert len(written) == 4 and [name.rsplit("-", 1)[0] for name in written] == [
        "both-a-cat-s0", "both-a-cat-s0", "both-a-dog-s0", "both-a-dog-s0"], written


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, tiny_model_dir):
    model, adapter = tiny_model_dir, tiny_model_dir / "adapter.safetensors"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_user_error(run_cli(capsys, "cache", "--model", model, "--out", tmp_path, tmp_path / "bad.png"), "bad.png")
    assert_user_error(run_cli(capsys, "cache", "--model", model, "--out", tmp_path, tmp_path / "missing.png"), "missing.png")
    good = png(tmp_path / "ok.png")
    assert_user_error(run_cli(capsys, "cache", "--model", model, "--out", tmp_path, "--subject-id", "../escape", good), "subject id")
    assert_user_error(run_cli(capsys, "cache", "--model", tmp_path, "--out", tmp_path, good), "not a diffusers")
    # a cache made with another base model is refused by generate
    from dreamcache.models import write_tiny_model
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert run_cli(capsys, "cache", "--model", other, "--out", tmp_path / "c", good)[0] == 0
    assert_user_error(run_cli(capsys, "generate", "--model", model, "--adapter", adapter, "--cache",
                              tmp_path / "c" / "ok.safetensors", "--prompt", "x", "--steps", "1"), "base model")
    (tmp_path / "half.safetensors").write_bytes(adapter.read_bytes()[:1000])
    assert run_cli(capsys, "cache", "--model", model, "--out", tmp_path / "c2", good)[0] == 0
    assert_user_error(run_cli(capsys, "generate", "--model", model, "--adapter", tmp_path / "half.safetensors", "--cache",
                              tmp_path / "c2" / "ok.safetensors", "--prompt", "x", "--steps", "1"), "half.safetensors")
    assert_user_error(run_cli(capsys, "convert-official", tmp_path / "bad.png", tmp_path / "o.safetensors"), "refusing to unpickle")


def test_generate_passes_eta(monkeypatch, tmp_path):
    """--eta reaches the pipeline call (0 by default, as the DreamBench script; the official sample_ref.sh uses 1)."""
    import dreamcache.cli as cli

    calls = []

    class FakePipe:
        def load_cache(self, uri):
            from types import SimpleNamespace
            return SimpleNamespace(info=SimpleNamespace(subject_id="s"))

        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            from types import SimpleNamespace
            return SimpleNamespace(images=[])

    monkeypatch.setattr(cli.runtime, "load_pipeline", lambda spec: FakePipe())
    base = ["generate", "--model", "m", "--adapter", "a", "--cache", "c.safetensors", "--prompt", "x",
            "--out", str(tmp_path)]
    assert main(base) == 0 and main([*base, "--eta", "1"]) == 0
    assert [c["eta"] for c in calls] == [0.0, 1.0]


def test_convert_official_command(tmp_path, capsys):
    buffer = io.BytesIO()
    torch.save({k: torch.zeros(s) for k, s in official_key_shapes().items()}, buffer)
    (tmp_path / "cross_attention-199999.pt").write_bytes(buffer.getvalue())
    code, out, err = run_cli(capsys, "convert-official", tmp_path / "cross_attention-199999.pt", tmp_path / "a.safetensors")
    assert code == 0 and (tmp_path / "a.safetensors").stat().st_size > 50_000_000, err


@pytest.mark.parametrize("command", [[], ["tiny-model"], ["cache"], ["generate"], ["convert-official"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and "usage: dreamcache" in capsys.readouterr().out


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "dreamcache.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "convert-official" in done.stdout


def test_parsers_build_without_heavy_imports():
    """`dreamcache --help` and the jobs' build_parser() (which tests/test_infra.py runs over the manifests) must
    stay fast: no torch, diffusers or Ray until a command runs."""
    code = (
        "import sys\n"
        "from dreamcache.cli import build_parser\n"
        "from pipelines.cli import add_ray_commands\n"
        "import jobs.cache_catalog, jobs.evaluate, jobs.generate_batch, jobs.train_adapters\n"
        "build_parser(add_ray_commands)\n"
        "for job in (jobs.cache_catalog, jobs.evaluate, jobs.generate_batch, jobs.train_adapters):\n"
        "    job.build_parser()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray', 'pydantic') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    # `dreamcache serve --help` alone loads pydantic (its flags are the fields of the Serve settings), and no more.
    serve_help = code.replace("build_parser(add_ray_commands)\n", "import contextlib, io\n"
                              "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                              "    build_parser(add_ray_commands).parse_args(['serve', '--help'])\n")
    done = subprocess.run([sys.executable, "-c", serve_help], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "['pydantic']", done.stdout + done.stderr


# -- command lines derived from the config dataclasses (dreamcache.cli_args) ----------------------------------------
def _job_parsers():
    """(config class, parser, its config from parsed args, the required options) for each job."""
    from jobs.cache_catalog import build_parser as caching_parser
    from jobs.evaluate import build_parser as evaluation_parser
    from jobs.generate_batch import build_parser as generation_parser
    from pipelines.caching.args import config_from_args as caching_config
    from pipelines.caching.config import CachingJobConfig
    from pipelines.evaluation.args import evaluation_from_args
    from pipelines.evaluation.config import EvaluationConfig
    from pipelines.generation.args import config_from_args as generation_config
    from pipelines.generation.settings import GenerationJobConfig

    return [(CachingJobConfig, caching_parser(), caching_config, {"out": "o", "model": "m", "images": "i"}),
            (GenerationJobConfig, generation_parser(), generation_config,
             {"model": "m", "adapter": "a", "caches": "c", "prompts": "p.txt"}),
            (EvaluationConfig, evaluation_parser(), evaluation_from_args,
             {"dataset": "d", "model": "m", "adapter": "a", "out": "o", "dino": "x", "clip": "y"})]


def _command_parsers():
    """(config class, the subcommand's parser) for the method's commands whose options are config fields."""
    from dreamcache import runtime
    from dreamcache.cli import CacheOptions, GenerateOptions, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(runtime.ModelSpec, sub.choices["cache"]), (CacheOptions, sub.choices["cache"]),
            (GenerateOptions, sub.choices["generate"])]


def test_every_config_field_is_exactly_one_flag():
    import dataclasses

    from dreamcache.cli_args import NOT_A_FLAG

    for config_class, parser in [(c, p) for c, p, _, _ in _job_parsers()] + _command_parsers():
        dests = [action.dest for action in parser._actions]
        for f in dataclasses.fields(config_class):
            expected = 0 if f.metadata.get("cli", {}) is NOT_A_FLAG["cli"] else 1
            assert dests.count(f.name) == expected, (config_class.__name__, f.name, dests.count(f.name))


def test_help_shows_every_default(monkeypatch):
    import dataclasses

    from dreamcache.cli_args import cli_fields, flag_of

    monkeypatch.setenv("COLUMNS", "2000")  # no default split across lines by wrapping
    for config_class, parser in [(c, p) for c, p, _, _ in _job_parsers()] + _command_parsers():
        blocks = re.split(r"\n(?=  -)", parser.format_help())  # one per option: its flags, then its help
        for f, _, _ in cli_fields(config_class):
            flag = flag_of(f.name)
            (block,) = [b for b in blocks if b.startswith(f"  {flag} ") or b.rstrip() == f"  {flag}"]
            shown = not (f.default is None or f.default is False or f.default is dataclasses.MISSING or f.default == "")
            assert (f"(default: {f.default})" in block) == shown, block
    assert "(default: 8)" in " ".join(run_help(["cache"]).split())  # the method's commands too


def run_help(argv: list[str]) -> str:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def test_parsed_config_equals_the_dataclass_built_directly():
    import dataclasses

    for config_class, parser, from_args, required in _job_parsers():
        argv = [x for name, value in required.items() for x in ("--" + name, value)]
        parsed = from_args(parser.parse_args(argv))
        # The caching job's run id is fresh per instance; the generation job's stays None.
        direct = dataclasses.replace(config_class(**required), run_id=parsed.run_id)
        assert parsed == direct, config_class.__name__
    caching, parser, from_args, _ = _job_parsers()[0]
    parsed = from_args(parser.parse_args(["--out", "o", "--model", "m", "--catalog", "c.csv", "--actors", "3",
                                          "--dtype", "fp16", "--actor-resources", '{"gpu_node": 1}',
                                          "--wait-for-resources"]))
    assert parsed == caching(out="o", model="m", catalog="c.csv", actors=3, dtype="fp16",
                             actor_resources={"gpu_node": 1}, wait_for_resources=True, run_id=parsed.run_id)
    # A field's text parser (--seeds), an older flag name (--guidance-mode), a value the caller converts (--subjects).
    generation, parser, from_args, required = _job_parsers()[1]
    argv = [x for name, value in required.items() for x in ("--" + name, value)]
    parsed = from_args(parser.parse_args([*argv, "--seeds", "0-2,7", "--guidance-mode", "joint", "--subjects", "a,b"]))
    assert parsed == generation(**required, seeds=[0, 1, 2, 7], guidance="joint", subjects=["a", "b"])
    # The evaluation's comma-separated subjects, a choice that holds a space (--backbone), the older mode flag.
    evaluation, parser, from_args, required = _job_parsers()[2]
    argv = [x for name, value in required.items() for x in ("--" + name, value)]
    parsed = from_args(parser.parse_args([*argv, "--subjects", "dog, can", "--backbone", "SD 1.5",
                                          "--guidance-mode", "joint"]))
    assert parsed == evaluation(**required, subjects=["dog", "can"], backbone="SD 1.5", guidance="joint")
    # Training: TrainingConfig's and ScaleConfig's fields, the older Ray flag names (--workers, --gpu, --ray-storage).
    from jobs.train_adapters import build_parser as training_parser
    from pipelines.training.args import training_from_args
    from dreamcache.training_config import TrainingConfig
    from pipelines.training.config import ScaleConfig

    base = ["--model", "m", "--data", "d", "--out", "o", "--steps", "5"]
    config, scale = training_from_args(training_parser().parse_args(
        [*base, "--workers", "2", "--gpu", "--ray-storage", "s3://b/runs", "--ray-address", "ray://h:10001"]))
    assert config == TrainingConfig(model="m", data="d", out="o", steps=5)
    assert scale == ScaleConfig(num_workers=2, use_gpu=True, storage_path="s3://b/runs", ray_address="ray://h:10001")
    assert training_from_args(training_parser().parse_args(base))[1] == ScaleConfig()
    # A one_of group: exactly one of its flags (--images, --catalog).
    caching_parser = _job_parsers()[0][1]
    for source in ([], ["--images", "i", "--catalog", "c"]):
        with pytest.raises(SystemExit):
            caching_parser.parse_args(["--out", "o", "--model", "m", *source])
