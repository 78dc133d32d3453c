"""DINO / CLIP-I / CLIP-T: the spec's preprocessing, and the metrics against a direct computation (tiny backbones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreamcache import storage
from dreamcache.dreambench import (
    EVAL_NOUNS,
    GENERATION_NOUNS,
    LIVE_SUBJECTS,
    REFERENCE_IMAGES,
    SUBJECTS,
    dreambench_prompts,
    summarize_scores,
    summary_markdown,
)
from dreamcache.metrics import (
    CLIP_MEAN,
    CLIP_PREPROCESS,
    CLIP_STD,
    DINO_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipEmbedder,
    DinoEmbedder,
    DreamBenchScorer,
    MetricBackbones,
    center_crop,
    resize_shorter_side,
)
from metrics_fixtures import write_tiny_clip, write_tiny_dino


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> MetricBackbones:
    root = tmp_path_factory.mktemp("metric-backbones")
    return MetricBackbones(dino=str(write_tiny_dino(root / "dino")), clip=str(write_tiny_clip(root / "clip")))


@pytest.fixture(scope="module")
def scorer(backbones) -> DreamBenchScorer:
    return DreamBenchScorer.from_pretrained(backbones)


def noise_image(seed: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# -- preprocessing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, resize, expected", [
    ((300, 200), 224, (336, 224)),  # landscape: the shorter side becomes 224, the longer int(224 * 300 / 200)
    ((200, 301), 256, (256, 385)),  # portrait: int(256 * 301 / 200) = 385 (truncation, as torchvision)
    ((224, 224), 224, (224, 224)),
])
def test_resize_shorter_side_follows_torchvision_rounding(size, resize, expected):
    assert resize_shorter_side(Image.new("RGB", size), resize).size == expected


def test_center_crop_offsets_are_rounded_half_differences():
    image = Image.fromarray(np.arange(385 * 256 * 3, dtype=np.uint32).reshape(385, 256, 3).astype(np.uint8))
    cropped = center_crop(image, 224)
    top, left = int(round((385 - 224) / 2.0)), int(round((256 - 224) / 2.0))  # 80 (round half to even), 16
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[top : top + 224, left : left + 224])


@pytest.mark.parametrize("preprocess, resize, mean, std", [
    (DINO_PREPROCESS, 256, IMAGENET_MEAN, IMAGENET_STD),
    (CLIP_PREPROCESS, 224, CLIP_MEAN, CLIP_STD),
])
def test_preprocess_is_bicubic_resize_center_crop_normalise(preprocess, resize, mean, std):
    image = noise_image(0)
    got = preprocess([image])
    # Direct computation with PIL: bicubic resize of the shorter side, centre 224 crop, /255, normalise.
    w, h = image.size
    scaled = image.resize((int(resize * w / h), resize), Image.Resampling.BICUBIC)
    left, top = round((scaled.width - 224) / 2), round((scaled.height - 224) / 2)
    pixels = np.asarray(scaled)[top : top + 224, left : left + 224].astype(np.float32) / 255.0
    expected = (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    assert got.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)


# -- metrics against a direct computation ---------------------------------------------------------------------------
def test_dino_embedding_is_the_normalised_cls_token(backbones):
    from transformers import ViTModel

    images = [noise_image(1), noise_image(2, (240, 320))]
    got = DinoEmbedder.from_pretrained(backbones.dino).embed(images)
    model = ViTModel.from_pretrained(backbones.dino, add_pooling_layer=False).eval()
    with torch.no_grad():
        cls = model(pixel_values=DINO_PREPROCESS(images)).last_hidden_state[:, 0]
    torch.testing.assert_close(got, F.normalize(cls, dim=-1))
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


def test_clip_embeddings_match_transformers_feature_functions(backbones):
    from transformers import CLIPModel

    images = [noise_image(3), noise_image(4)]
    texts = ["a red toy on the beach", "a dog"]
    clip = ClipEmbedder.from_pretrained(backbones.clip)
    model = CLIPModel.from_pretrained(backbones.clip).eval()
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=CLIP_PREPROCESS(images))
        tokens = clip.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text_features = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    image_features = getattr(image_features, "pooler_output", image_features)  # transformers 5 returns an output
    text_features = getattr(text_features, "pooler_output", text_features)
    torch.testing.assert_close(clip.embed_images(images), F.normalize(image_features, dim=-1))
    torch.testing.assert_close(clip.embed_texts(texts), F.normalize(text_features, dim=-1))


def test_scores_are_mean_pairwise_cosines(scorer):
    sources = [noise_image(10), noise_image(11, (256, 256)), noise_image(12, (200, 300))]
    generated = [noise_image(20, (64, 64)), noise_image(21, (64, 64))]
    captions = ["a red toy in the snow", "a cat"]
    scores = scorer.score(generated, captions, {"all": scorer.embed_sources(sources),
                                                "ref": scorer.embed_sources(sources[:1])})
    dino_s, dino_g = scorer.dino.embed(sources), scorer.dino.embed(generated)
    clip_s, clip_g = scorer.clip.embed_images(sources), scorer.clip.embed_images(generated)
    text = scorer.clip.embed_texts(captions)
    for i in range(2):  # the official (src @ gen.T).mean(), per generated image
        assert scores["dino_all"][i] == pytest.approx(float(np.mean([dino_s[j] @ dino_g[i] for j in range(3)])), abs=1e-5)
        assert scores["clip_i_all"][i] == pytest.approx(float(np.mean([clip_s[j] @ clip_g[i] for j in range(3)])), abs=1e-5)
        assert scores["dino_ref"][i] == pytest.approx(float(dino_s[0] @ dino_g[i]), abs=1e-5)
        assert scores["clip_i_ref"][i] == pytest.approx(float(clip_s[0] @ clip_g[i]), abs=1e-5)
        assert scores["clip_t"][i] == pytest.approx(float(text[i] @ clip_g[i]), abs=1e-5)


def test_an_image_scores_one_against_itself(scorer):
    image = noise_image(5)
    scores = scorer.score([image], ["x"], {"all": scorer.embed_sources([image])})
    assert scores["dino_all"][0] == pytest.approx(1.0, abs=1e-5)
    assert scores["clip_i_all"][0] == pytest.approx(1.0, abs=1e-5)
    other = scorer.score([noise_image(6, (64, 64))], ["x"], {"all": scorer.embed_sources([image])})
    assert other["dino_all"][0] < 0.999  # the metric can fail


def test_backbones_load_from_s3(backbones, s3_prefix):
    storage.upload_dir(backbones.dino, f"{s3_prefix}/dino")
    storage.upload_dir(backbones.clip, f"{s3_prefix}/clip")
    remote = DreamBenchScorer.from_pretrained(MetricBackbones(dino=f"{s3_prefix}/dino", clip=f"{s3_prefix}/clip"))
    image = noise_image(7)
    local = DreamBenchScorer.from_pretrained(backbones)
    torch.testing.assert_close(remote.dino.embed([image]), local.dino.embed([image]))
    torch.testing.assert_close(remote.clip.embed_texts(["a dog"]), local.clip.embed_texts(["a dog"]))


def test_missing_backbone_folder_is_a_clear_error(tmp_path):
    with pytest.raises(storage.ObjectNotFound, match="not found"):
        DinoEmbedder.from_pretrained(str(tmp_path / "no-such-dino"))


# -- the DreamBench protocol data and averaging ----------------------------------------------------------------------
def test_dreambench_lists_match_the_protocol():
    assert len(SUBJECTS) == 30 and len(LIVE_SUBJECTS) == 9 and set(REFERENCE_IMAGES) == set(SUBJECTS)
    rows = dreambench_prompts()
    assert len(rows) == 750
    dog = [r for r in rows if r.subject == "dog"]
    assert dog[0].prompt == "a photo of a dog, in the jungle" and dog[0].eval_caption == "a dog in the jungle"
    assert dog[10].prompt == "a photo of a dog, wearing a red hat"  # live subjects: accessories and outfits
    assert dog[24].prompt == "a photo of a cube shaped dog" and dog[24].eval_caption == "a cube shaped dog"
    can = [r for r in rows if r.subject == "can"]
    assert can[10].prompt == "a photo of a can, with a wheat field in the background"
    sneaker = [r for r in rows if r.subject == "colorful_sneaker"][0]
    assert sneaker.prompt == "a photo of a sneakers, in the jungle" and sneaker.eval_caption == "a sneaker in the jungle"
    assert GENERATION_NOUNS["robot_toy"] == "toy robot" and EVAL_NOUNS["robot_toy"] == "robot toy"
    with pytest.raises(ValueError, match="not DreamBench subjects"):
        dreambench_prompts(["not_a_subject"])


def test_summary_averages_images_then_prompts_then_subjects():
    rows = []
    # can: prompt 0 has images 1.0 and 0.0 (mean 0.5), prompt 1 has one image 1.0 -> subject mean 0.75
    # dog: one prompt, one image 0.1 -> 0.1.  Overall = mean(0.75, 0.1), not the mean of the 4 images.
    for subject, prompt, value in [("can", 0, 1.0), ("can", 0, 0.0), ("can", 1, 1.0), ("dog", 0, 0.1)]:
        rows.append({"subject": subject, "prompt_index": prompt, **{c: value for c in
                     ("dino_all", "clip_i_all", "clip_t", "dino_ref", "clip_i_ref")}})
    summary = summarize_scores(rows)
    assert summary["objects"]["dino_all"] == pytest.approx(0.75)
    assert summary["live"]["clip_t"] == pytest.approx(0.1)
    assert summary["overall"]["clip_i_all"] == pytest.approx((0.75 + 0.1) / 2)
    assert (summary["overall"]["subjects"], summary["overall"]["prompts"], summary["overall"]["images"]) == (2, 3, 4)
    markdown = summary_markdown(summary, backbone="SD 2.1")
    assert "| overall | 2 | 3 | 4 |" in markdown and "0.767" in markdown and "(same backbone)" in markdown
