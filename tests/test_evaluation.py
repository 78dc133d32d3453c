"""The DreamBench job end to end on the local Ray and the S3 server: caching, batch generation, scoring, summary."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dreamcache import storage
from dreamcache.dreambench import summarize_scores
from dreamcache.images import decode_image
from dreamcache.metrics import DreamBenchScorer, MetricBackbones
from metrics_fixtures import write_tiny_clip, write_tiny_dino
from training_fixtures import shape_triplet

SUBJECTS = ("can", "dog")  # one object (keep-list reference 01.jpg), one live subject (02.jpg)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> MetricBackbones:
    root = tmp_path_factory.mktemp("eval-backbones")
    return MetricBackbones(dino=str(write_tiny_dino(root / "dino")), clip=str(write_tiny_clip(root / "clip")))


@pytest.fixture
def dreambench(s3_prefix) -> str:
    """A DreamBooth-layout dataset on S3: <subject>/00.jpg .. 02.jpg."""
    rng = np.random.default_rng(0)
    for subject in SUBJECTS:
        for index in range(3):
            image, _, _, _ = shape_triplet(rng, 96)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            storage.write_bytes(f"{s3_prefix}/dataset/{subject}/{index:02d}.jpg", buffer.getvalue())
    return f"{s3_prefix}/dataset"


def test_dreambench_job_scores_every_image_and_writes_the_summary(ray_cluster, tiny_model_dir, backbones, dreambench,
                                                                  s3_prefix, capsys):
    from jobs.evaluate import main

    out = f"{s3_prefix}/eval"
    code = main(["--dataset", dreambench, "--model", str(tiny_model_dir),
                 "--adapter", str(tiny_model_dir / "adapter.safetensors"), "--out", out, "--dino", backbones.dino,
                 "--clip", backbones.clip, "--subjects", ",".join(SUBJECTS), "--prompts-per-subject", "2",
                 "--images-per-prompt", "2", "--steps", "2", "--batch-size", "4", "--backbone", "SD 2.1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| overall | 2 | 4 | 8 |" in printed.out and "paper: DreamCache SD 2.1 (same backbone)" in printed.out

    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/scores.parquet"))).to_pylist()
    assert len(rows) == 2 * 2 * 2 and all(r["status"] == "ok" for r in rows)
    assert {(r["subject"], r["kind"]) for r in rows} == {("can", "object"), ("dog", "live")}
    assert {r["seed"] for r in rows} == {0, 1}
    dog = sorted((r for r in rows if r["subject"] == "dog"), key=lambda r: (r["prompt_index"], r["seed"]))
    assert dog[0]["prompt"] == "a photo of a dog, in the jungle" and dog[0]["eval_caption"] == "a dog in the jungle"

    # One image rescored directly: same backbones, the subject's 3 real images and its keep-list reference.
    scorer = DreamBenchScorer.from_pretrained(backbones)
    def load(uri):
        return decode_image(storage.read_bytes(uri), uri)

    real = [load(f"{dreambench}/dog/{i:02d}.jpg") for i in range(3)]
    direct = scorer.score([load(dog[0]["image_uri"])], [dog[0]["eval_caption"]],
                          {"all": scorer.embed_sources(real), "ref": scorer.embed_sources([real[2]])})
    for column in ("dino_all", "clip_i_all", "clip_t", "dino_ref", "clip_i_ref"):
        assert dog[0][column] == pytest.approx(direct[column][0], abs=1e-5)

    details = json.loads(storage.read_bytes(f"{out}/summary.json"))
    expected = summarize_scores(rows)
    assert details["summary"]["overall"]["clip_t"] == pytest.approx(expected["overall"]["clip_t"])
    assert set(details["summary"]) == {"overall", "objects", "live"}
    assert storage.read_bytes(f"{out}/summary.md").decode().startswith("## DreamBench")
    assert storage.exists(f"{out}/caches/can.safetensors")  # references went through the caching job


def test_a_missing_subject_is_a_clear_error(ray_cluster, tiny_model_dir, backbones, dreambench, s3_prefix, capsys):
    from jobs.evaluate import main

    code = main(["--dataset", dreambench, "--model", str(tiny_model_dir), "--adapter", "a.safetensors",
                 "--out", f"{s3_prefix}/eval2", "--dino", backbones.dino, "--clip", backbones.clip,
                 "--subjects", "can,teapot"])
    assert code == 2 and "no images for subject 'teapot'" in capsys.readouterr().err
    assert main(["--dataset", dreambench, "--model", "m", "--adapter", "a", "--out", "o", "--dino", "d",
                 "--clip", "c", "--subjects", "not_a_subject"]) == 2
