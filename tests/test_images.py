"""Tests for dreamcache.images: the shared decoder and reference preprocessing.

Every test image is built in memory with PIL; nothing touches the network.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dreamcache.images import (
    ImageDecodeError,
    ImageLimits,
    decode_image,
    load_image_file,
    prepare_reference,
    sha256_hex,
    to_tensor,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def close_to(actual, expected, tol: int = 3) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid signature and IHDR but no pixel data: only its header is real."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def noisy_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    # Noise compresses badly, so cutting the file in half really removes pixel data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# --- accepted inputs ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_accepted_formats_to_rgb(fmt: str) -> None:
    data = encode(Image.new("RGB", (40, 30), RED), fmt)
    img = decode_image(data, source="red." + fmt.lower())
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    assert close_to(img.getpixel((20, 15)), RED, tol=8)


def test_result_is_detached_from_the_input_file() -> None:
    img = decode_image(encode(Image.new("RGB", (16, 16), RED), "PNG"))
    # Usable after decode_image closed its file: these would raise on a closed image.
    assert img.copy().getpixel((0, 0)) == RED
    assert img.resize((8, 8)).size == (8, 8)


def test_rgba_transparent_pixels_become_white() -> None:
    src = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    src.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    src.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    img = decode_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert close_to(img.getpixel((1, 0)), (127, 127, 127), tol=2)
    assert img.getpixel((5, 5)) == RED


def test_la_transparent_pixels_become_white() -> None:
    src = Image.new("LA", (16, 16), (0, 255))
    src.putpixel((3, 3), (0, 0))
    img = decode_image(encode(src, "PNG"))
    assert img.getpixel((3, 3)) == WHITE
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white() -> None:
    src = Image.new("P", (16, 16), 1)
    src.putpalette([0, 0, 255] + [255, 0, 0] + [0] * (254 * 3))
    src.putpixel((2, 2), 0)
    data = encode(src, "PNG", transparency=0)  # palette index 0 (blue) is transparent
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == WHITE
    assert img.getpixel((8, 8)) == RED


def test_grayscale_becomes_rgb() -> None:
    img = decode_image(encode(Image.new("L", (16, 16), 100), "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == (100, 100, 100)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    samples = np.full((16, 16), 32768, dtype=np.uint16)
    samples[0, 0] = 0
    samples[0, 1] = 65535
    src = Image.fromarray(samples)
    assert src.mode == "I;16"
    img = decode_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert close_to(img.getpixel((8, 8)), (128, 128, 128), tol=1)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((1, 0)) == WHITE


def test_cmyk_jpeg_becomes_rgb() -> None:
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    data = encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB"
    assert close_to(img.getpixel((8, 8)), RED, tol=10)


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (64, 32), RED)
    src.paste((0, 0, 255), (0, 0, 8, 8))  # blue marker in the stored top-left corner
    exif = src.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(src, "JPEG", exif=exif, quality=95)
    img = decode_image(data)
    assert img.size == (32, 64)
    # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
    assert close_to(img.getpixel((28, 3)), (0, 0, 255), tol=40)
    assert close_to(img.getpixel((3, 3)), RED, tol=40)


def test_mpo_from_phone_cameras_counts_as_jpeg() -> None:
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 0, 255))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    img = decode_image(data, limits=ImageLimits(formats=("JPEG",)))
    assert close_to(img.getpixel((8, 8)), RED, tol=10)


def test_animated_image_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 0, 255))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert decode_image(data).getpixel((8, 8)) == RED


# --- refused inputs ----------------------------------------------------------------


def assert_refused(data: bytes, expected_reason: str, limits: ImageLimits = ImageLimits()) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, source="upload-42.png", limits=limits)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.source == "upload-42.png"
    assert "'upload-42.png'" in str(err)
    assert expected_reason in err.reason
    assert str(err) == f"cannot use image 'upload-42.png': {err.reason}"
    return err


def test_refuses_empty_bytes() -> None:
    assert_refused(b"", "empty file")


def test_refuses_random_bytes() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused(data, "not an image")


def test_refuses_text() -> None:
    assert_refused(b"name,price\nmug,12.50\n" * 20, "not an image")


def test_refuses_truncated_png() -> None:
    data = encode(noisy_rgb(), "PNG")
    assert decode_image(data).size == (64, 48)  # the untruncated file is fine
    assert_refused(data[: len(data) // 2], "truncated or corrupt")


def test_refuses_truncated_jpeg() -> None:
    data = encode(noisy_rgb(), "JPEG", quality=90)
    assert decode_image(data).size == (64, 48)
    assert_refused(data[: len(data) // 2], "truncated or corrupt")


def test_truncation_is_refused_without_touching_global_switches() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError):
        decode_image(encode(noisy_rgb(), "PNG")[:300])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == before


def test_refuses_gif_by_format_name() -> None:
    data = encode(Image.new("P", (16, 16), 0), "GIF")
    err = assert_refused(data, "format GIF is not accepted")
    assert err.reason == "format GIF is not accepted; accepted: PNG, JPEG, WEBP"


def test_format_list_is_configurable() -> None:
    data = encode(Image.new("RGB", (16, 16), RED), "WEBP")
    assert_refused(data, "format WEBP is not accepted; accepted: PNG", ImageLimits(formats=("png",)))


def test_refuses_real_image_over_pixel_limit() -> None:
    data = encode(Image.new("RGB", (100, 50), RED), "PNG")
    assert_refused(data, "100x50 = 5000 pixels exceeds the limit of 4999", ImageLimits(max_pixels=4999))
    assert decode_image(data, limits=ImageLimits(max_pixels=5000)).size == (100, 50)


def test_refuses_header_claiming_huge_size_before_decoding() -> None:
    # Header-only: decoding would fail as truncated, so the pixel message proves the
    # size was judged from the header before any decode was attempted.
    assert_refused(png_header_only(7000, 7000), "7000x7000 = 49000000 pixels exceeds the limit of 40000000")


def test_refuses_header_past_pillow_bomb_threshold() -> None:
    # 20000 x 20000 is past Pillow's own guard; whichever check fires, it is our error type.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no stray DecompressionBombWarning escapes
        assert_refused(png_header_only(20000, 20000), "pixels")


def test_pillow_bomb_warning_is_fatal_when_own_limit_is_higher() -> None:
    # 10000 x 10000 = 1e8 is between MAX_IMAGE_PIXELS and twice it: Pillow only warns.
    err = assert_refused(png_header_only(10000, 10000), "decompression bomb", ImageLimits(max_pixels=10**9))
    assert "pixels" in err.reason


def test_refuses_oversized_bytes() -> None:
    data = encode(noisy_rgb(), "PNG")
    assert_refused(data, f"{len(data)} bytes exceeds the limit of 1000", ImageLimits(max_bytes=1000))


def test_refuses_too_small_image() -> None:
    data = encode(Image.new("RGB", (7, 64), RED), "PNG")
    assert_refused(data, "7x64 is too small; each side must be at least 8 pixels")
    assert decode_image(encode(Image.new("RGB", (8, 64), RED), "PNG")).size == (8, 64)


def test_rejects_non_bytes_input() -> None:
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_error_survives_pickling() -> None:
    # Ray moves exceptions between processes by pickling them.
    err = pickle.loads(pickle.dumps(ImageDecodeError("s3://bucket/a.png", "empty file")))
    assert isinstance(err, ImageDecodeError)
    assert (err.source, err.reason) == ("s3://bucket/a.png", "empty file")
    assert str(err) == "cannot use image 's3://bucket/a.png': empty file"


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_pixels": -1}, {"min_side": 0}, {"formats": ()}, {"formats": ("JPG",)}],
)
def test_invalid_limits_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ImageLimits(**kwargs)


# --- files -------------------------------------------------------------------------


def test_load_image_file(tmp_path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(encode(Image.new("RGB", (16, 24), RED), "PNG"))
    assert load_image_file(path).size == (16, 24)
    assert load_image_file(str(path)).getpixel((0, 0)) == RED


def test_load_image_file_missing_names_path(tmp_path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError) as info:
        load_image_file(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "not found" in info.value.reason


def test_load_image_file_directory(tmp_path) -> None:
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image_file(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions as non-root")
def test_load_image_file_unreadable(tmp_path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(encode(Image.new("RGB", (16, 16), RED), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(ImageDecodeError, match="permission denied"):
            load_image_file(path)
    finally:
        path.chmod(0o600)


def test_load_image_file_over_byte_limit(tmp_path) -> None:
    path = tmp_path / "big.png"
    data = encode(noisy_rgb(), "PNG")
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=f"{len(data)} bytes exceeds the limit of 100"):
        load_image_file(path, limits=ImageLimits(max_bytes=100))


def test_load_image_file_bad_content_names_path(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("just text")
    with pytest.raises(ImageDecodeError) as info:
        load_image_file(path)
    assert info.value.source == str(path)
    assert "not an image" in info.value.reason


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(b"abc") != sha256_hex(b"abd")


# --- preprocessing -----------------------------------------------------------------


def test_prepare_reference_resize_stretches_to_square() -> None:
    src = Image.new("RGB", (200, 100), RED)
    out = prepare_reference(src, 64)
    assert out.size == (64, 64)
    # Plain resize: no padding anywhere, the corners keep the content colour.
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((63, 63)) == RED


def test_prepare_reference_resize_matches_pil_bilinear() -> None:
    src = noisy_rgb(100, 60)
    out = prepare_reference(src, (32, 48), mode="resize")
    assert out.size == (48, 32)  # resolution is (height, width)
    expected = src.resize((48, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_prepare_reference_pad_keeps_aspect_on_white() -> None:
    src = Image.new("RGB", (200, 100), RED)
    out = prepare_reference(src, 64, mode="pad")
    assert out.size == (64, 64)
    for corner in [(0, 0), (63, 0), (0, 63), (63, 63)]:
        assert out.getpixel(corner) == WHITE
    # 2:1 content scaled to 64x32, centred vertically: rows 16..47 are red.
    column = np.asarray(out)[:, 32]
    red_rows = np.flatnonzero((column == RED).all(axis=1))
    assert red_rows.min() == 16 and red_rows.max() == 47
    assert out.getpixel((0, 32)) == RED and out.getpixel((63, 32)) == RED


def test_prepare_reference_pad_tall_image_rectangular_target() -> None:
    src = Image.new("RGB", (50, 200), RED)
    out = prepare_reference(src, (64, 128), mode="pad")
    assert out.size == (128, 64)
    # Content becomes 16x64 centred horizontally: columns 56..71.
    row = np.asarray(out)[32]
    red_cols = np.flatnonzero((row == RED).all(axis=1))
    assert red_cols.min() == 56 and red_cols.max() == 71


def test_prepare_reference_converts_alpha_input_onto_white() -> None:
    src = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert prepare_reference(src, 16).getpixel((8, 8)) == WHITE


@pytest.mark.parametrize("resolution", [0, -8, 500, 513, (512, 500), (512,), (512, 512, 512), 512.0, True, "512"])
def test_prepare_reference_rejects_bad_resolution(resolution) -> None:
    with pytest.raises(ValueError):
        prepare_reference(Image.new("RGB", (16, 16)), resolution)


def test_prepare_reference_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        prepare_reference(Image.new("RGB", (16, 16)), 16, mode="crop")  # type: ignore[arg-type]


def test_to_tensor_shape_dtype_and_range() -> None:
    black = Image.new("RGB", (24, 16), (0, 0, 0))
    white = Image.new("RGB", (24, 16), WHITE)
    mixed = Image.new("RGB", (24, 16), (255, 0, 0))
    tensor = to_tensor([black, white, mixed])
    assert tensor.shape == (3, 3, 16, 24)
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert torch.all(tensor[0] == -1.0)
    assert torch.all(tensor[1] == 1.0)
    # Channel order is RGB: red channel +1, green and blue -1.
    assert torch.all(tensor[2, 0] == 1.0) and torch.all(tensor[2, 1:] == -1.0)


def test_to_tensor_preserves_pixel_layout() -> None:
    src = noisy_rgb(24, 16)
    tensor = to_tensor([src])
    expected = torch.from_numpy(np.asarray(src).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.allclose(tensor[0], expected)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_to_tensor_rejects_mixed_sizes_and_empty() -> None:
    with pytest.raises(ValueError, match="one size"):
        to_tensor([Image.new("RGB", (16, 16)), Image.new("RGB", (16, 24))])
    with pytest.raises(ValueError):
        to_tensor([])


def test_pixels_to_input_is_bit_identical_to_the_pil_path() -> None:
    from dreamcache.images import pixels_to_input

    # Every uint8 value, in a shape whose channels-last to channels-first reorder matters.
    values = np.arange(256 * 6, dtype=np.int64).reshape(2, 16, 16, 3) % 256
    pixels = np.ascontiguousarray(values.astype(np.uint8)[:, :, ::-1])  # a non-trivial layout, made contiguous
    images = [Image.fromarray(p) for p in pixels]
    # The conversion every cache was made with: numpy float32 arithmetic on the PIL images' bytes.
    expected = torch.from_numpy(np.stack([np.asarray(i) for i in images]).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    got = pixels_to_input(pixels)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 16, 16) and got.is_contiguous()
    assert torch.equal(got, expected) and torch.equal(to_tensor(images), expected)
    assert torch.equal(pixels_to_input(pixels, "cpu", torch.float16), expected.half())  # the cast commutes
    # Bytes as a job stage passes them on: a read-only view, read as is, without a warning per batch.
    frozen = np.frombuffer(pixels.tobytes(), np.uint8).reshape(pixels.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pixels_to_input(frozen), expected)
    for bad in (pixels.astype(np.float32), pixels[..., :2], pixels[0], pixels[:0]):
        with pytest.raises(ValueError):
            pixels_to_input(bad)
