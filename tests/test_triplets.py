"""Triplet data: the reference construction of spec 3.2, the Parquet format, and the resumable stream."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamcache import storage
from dreamcache.triplets import (
    NO_AUGMENT,
    ReferenceAugment,
    StreamPosition,
    TripletError,
    TripletStream,
    build_reference,
    collate,
    cut_out_foreground,
    foreground_mask,
    image_bytes,
    place_on_canvas,
    prepare_triplet,
    random_erase,
    sample_rng,
    write_triplets,
)
from training_fixtures import shape_rows, shape_triplet

WHITE = np.array([255, 255, 255], dtype=np.uint8)


def red_square(size=96, box=(20, 30, 60, 50), background=(0, 90, 0)):
    """A target with a red rectangle on green, and its mask."""
    target = Image.new("RGB", (size, size), background)
    target.paste((220, 20, 20), box)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return target, mask


def non_white_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((pixels != WHITE).any(axis=-1))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


# -- reference construction ----------------------------------------------------------------------------------------
def test_cut_out_paints_the_background_white_and_crops_to_the_mask_box():
    target, mask = red_square()
    cut = np.asarray(cut_out_foreground(target, foreground_mask(mask, target.size)))
    assert cut.shape == (20, 40, 3)  # box (20, 30)-(60, 50): 40 wide, 20 high
    assert (cut == [220, 20, 20]).all()  # no green background left


def test_reference_is_the_foreground_rescaled_and_placed_inside_a_white_canvas():
    target, mask = red_square()
    fg = foreground_mask(mask, target.size)
    for seed in range(40):
        ref = build_reference(target, fg, 64, np.random.default_rng(seed), NO_AUGMENT)
        assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
        left, top, right, bottom = non_white_box(ref)
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 64  # the box lies inside the canvas
        assert right - left >= int(0.7 * 64) - 1  # width drawn in [0.7 W, W] (aspect 2:1 fits the canvas)
        assert not (ref == [0, 90, 0]).all(axis=-1).any()  # the target's background never leaks in
        outside = np.ones(ref.shape[:2], bool)
        outside[top:bottom, left:right] = False
        assert (ref[outside] == WHITE).all()  # everything around the subject is white


def test_tall_foreground_keeps_its_aspect_and_is_clamped_to_the_canvas():
    tall = Image.new("RGB", (10, 40), (0, 0, 200))
    for seed in range(20):
        canvas = np.asarray(place_on_canvas(tall, 64, np.random.default_rng(seed), 0.7))
        left, top, right, bottom = non_white_box(canvas)
        assert bottom - top <= 64 and (right - left) / (bottom - top) == pytest.approx(0.25, abs=0.05)


def test_reference_augmentation_is_seeded():
    target, mask = red_square()
    fg = foreground_mask(mask, target.size)
    make = lambda seed: build_reference(target, fg, 64, sample_rng(0, 0, f"row-{seed}"))  # noqa: E731
    np.testing.assert_array_equal(make(1), make(1))
    assert any((make(1) != make(s)).any() for s in range(2, 6))


def test_random_erasing_paints_a_white_rectangle_of_two_to_25_percent():
    areas = []
    for seed in range(50):
        erased = random_erase(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(seed), ReferenceAugment())
        white = (erased == WHITE).all(axis=-1)
        ys, xs = np.nonzero(white)
        assert white.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one solid rectangle
        areas.append(white.mean())
    assert 0.015 <= min(areas) and max(areas) <= 0.26


def test_flip_mirrors_and_jitter_changes_the_reference():
    target, mask = red_square()
    fg = foreground_mask(mask, target.size)
    flipped = build_reference(target, fg, 64, np.random.default_rng(3), ReferenceAugment(
        min_width_fraction=1.0, flip_p=1.0, jitter_p=0.0, erase_p=0.0))
    plain = build_reference(target, fg, 64, np.random.default_rng(3), NO_AUGMENT)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    jittered = build_reference(target, fg, 64, np.random.default_rng(3), ReferenceAugment(
        min_width_fraction=1.0, flip_p=0.0, jitter_p=1.0, hue=0.0, brightness=0.0, erase_p=0.0))
    assert (jittered != plain).any() and jittered.shape == plain.shape


def test_caption_dropout_rate_is_about_seven_percent():
    target, mask = red_square(32, (4, 4, 20, 20))
    row = {"caption": "a red square", "target": target, "mask": mask}
    dropped = sum(prepare_triplet(row, 32, np.random.default_rng(i)).caption == "" for i in range(1500))
    assert 60 <= dropped <= 150  # 7 % of 1500 = 105; binomial sd ~ 10


# -- rows -------------------------------------------------------------------------------------------------------
def test_rows_with_bytes_uris_or_an_explicit_reference(tmp_path):
    target, mask = red_square()
    (tmp_path / "t.png").write_bytes(image_bytes(target))
    (tmp_path / "m.png").write_bytes(image_bytes(mask))
    by_uri = prepare_triplet({"caption": "x", "target_uri": str(tmp_path / "t.png"),
                              "mask_uri": str(tmp_path / "m.png")}, 64, np.random.default_rng(0), caption_dropout=0)
    by_bytes = prepare_triplet({"caption": "x", "target": image_bytes(target), "mask": image_bytes(mask)}, 64,
                               np.random.default_rng(0), caption_dropout=0)
    np.testing.assert_array_equal(by_uri.reference, by_bytes.reference)
    assert by_uri.target.shape == (64, 64, 3) and by_uri.caption == "x"
    given = prepare_triplet({"caption": None, "target": image_bytes(target), "reference": image_bytes(mask)}, 64,
                            np.random.default_rng(0), NO_AUGMENT)
    assert given.reference.shape == (64, 64, 3) and given.caption == ""
    batch = collate([by_uri, given])
    assert batch.target.shape == (2, 3, 64, 64) and -1.0 <= batch.reference.min() <= batch.reference.max() <= 1.0


@pytest.mark.parametrize("row, message", [
    ({"caption": "x", "mask": b"..."}, "no target image"),
    ({"caption": "x", "target": b"not an image", "mask": b"..."}, "not an image"),
    ({"caption": "x", "target": "TARGET"}, "needs a mask or a reference"),
    ({"caption": "x", "target": "TARGET", "mask": "EMPTY"}, "no foreground"),
    ({"caption": "x", "target_uri": "/nonexistent/t.png", "mask": "EMPTY"}, "cannot read target"),
])
def test_bad_rows_raise_a_clear_triplet_error(row, message):
    target, _ = red_square()
    images = {"TARGET": image_bytes(target), "EMPTY": image_bytes(Image.new("L", (96, 96), 0))}
    row = {k: images.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
    with pytest.raises(TripletError, match=message):
        prepare_triplet(row, 64, np.random.default_rng(0))


# -- Parquet and the stream --------------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path):
    write_triplets(shape_rows(10, seed=1), str(tmp_path / "a.parquet"), row_group_size=4)
    write_triplets(shape_rows(7, seed=2), str(tmp_path / "b.parquet"), row_group_size=4)
    return str(tmp_path)


def first_epoch(stream: TripletStream, start=StreamPosition()) -> list[tuple[str, StreamPosition]]:
    out = []
    for row, epoch, after in stream.rows(start):
        if epoch > 0:
            return out
        out.append((row["id"], after))
    return out


def test_an_epoch_visits_every_row_once_in_a_seeded_order(dataset):
    stream = TripletStream(dataset, seed=3)
    assert len(stream) == 17 and len(stream.units) == 5  # row groups 4+4+2 and 4+3
    ids = [i for i, _ in first_epoch(stream)]
    assert sorted(ids) == sorted([f"s1-{i:05d}" for i in range(10)] + [f"s2-{i:05d}" for i in range(7)])
    assert ids == [i for i, _ in first_epoch(TripletStream(dataset, seed=3))]
    assert ids != [i for i, _ in first_epoch(TripletStream(dataset, seed=4))]
    second = []
    for row, epoch, _ in stream.rows(StreamPosition(epoch=1)):
        if epoch > 1:
            break
        second.append(row["id"])
    assert sorted(second) == sorted(ids) and second != ids  # a new epoch, a new order


def test_resuming_at_a_position_continues_with_the_next_row(dataset):
    stream = TripletStream(dataset, seed=0)
    epoch = first_epoch(stream)
    for cut in (0, 3, 4, 9, 16):
        _, position = epoch[cut]
        resumed = [i for i, _ in first_epoch(stream, position)]
        assert resumed == [i for i, _ in epoch[cut + 1 :]]


def test_stream_reads_from_s3(s3_prefix):
    uri = f"{s3_prefix}/triplets/part-0.parquet"
    write_triplets(shape_rows(5, seed=9), uri)
    rows = [row for row, _, _ in itertools.islice(TripletStream(f"{s3_prefix}/triplets").rows(), 5)]
    assert sorted(r["id"] for r in rows) == [f"s9-{i:05d}" for i in range(5)]
    sample = prepare_triplet(rows[0], 64, np.random.default_rng(0))
    assert sample.reference.shape == (64, 64, 3)


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        TripletStream(str(tmp_path / "empty"))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"caption": ["x"], "target": [b"..."]}), buffer)
    storage.write_bytes(str(tmp_path / "nomask" / "x.parquet"), buffer.getvalue())
    with pytest.raises(TripletError, match="mask or reference column"):
        TripletStream(str(tmp_path / "nomask"))
    with pytest.raises(ValueError, match="unknown triplet columns"):
        write_triplets([{"caption": "x", "image": b""}], str(tmp_path / "bad.parquet"))


def test_synthetic_shapes_have_matching_masks():
    target, mask, caption, colour = shape_triplet(np.random.default_rng(0), 64)
    fg = foreground_mask(mask, target.size)
    assert (np.asarray(target)[fg] == colour).all() and caption.startswith("a ")
