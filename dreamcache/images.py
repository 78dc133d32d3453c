"""The one image decoder for every DreamCache entry point, plus reference preprocessing.

Reference images reach DreamCache from the CLI (local files), from Ray jobs (object
storage) and from the HTTP server (uploads). All of them are untrusted bytes, so they
all go through :func:`decode_image`, which applies the same :class:`ImageLimits` and
raises the same :class:`ImageDecodeError` for every bad input. Having one decoder means:

* a decompression bomb, a truncated upload or an unexpected format is refused the same
  way everywhere, before any pixel is decoded where that is possible;
* every caller gets the same normalised result (RGB, EXIF orientation applied, alpha
  composited onto white, 16-bit data scaled rather than clipped), so the same file
  gives the same conditioning no matter how it arrived;
* callers only have to catch one exception type (a ``ValueError``) and can report its
  ``source`` and ``reason`` to the user.

PIL's process-wide switches (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``)
are deliberately left alone: other code in the same process may rely on them, and the
limits here are per call.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DreamCacheError, InvalidValue

if TYPE_CHECKING:  # torch is imported by pixels_to_input alone: decoding and limits (job parsers, readers) need none
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ImageDecodeError",
    "ImageLimits",
    "PreprocessMode",
    "decode_image",
    "load_image_file",
    "pixels_to_input",
    "prepare_reference",
    "sha256_hex",
    "to_tensor",
]

PreprocessMode = Literal["resize", "pad"]

# Background for transparent pixels. White matches how product and subject photos are
# usually shot and what a viewer shows; black would turn transparent cut-outs into
# dark silhouettes that the conditioning model would then faithfully copy.
_BACKGROUND = (255, 255, 255)

# Pillow reports JPEGs that carry an MPO index (most phone cameras write one for depth
# or preview images) as "MPO". They are JPEGs to every user, so they are judged as JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Exceptions that Pillow's parsers and decoders raise on malformed data. Decoders of
# untrusted input raise a grab-bag of types; any of these means "these bytes are unusable".
_CORRUPT_DATA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)

# Integer modes whose samples use the 16-bit range (PNG 16-bit grayscale opens as one of
# these). Pillow's own convert("L") clips them at 255, which turns almost every pixel white.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageDecodeError(DreamCacheError, ValueError):
    """Raised for any input that cannot be used as an image, whatever the reason.

    ``source`` names the input (a path, an object key, an upload name) and ``reason``
    says what is wrong with it, so entry points can report both without parsing text.
    """

    kind = "unreadable"

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot use image '{source}': {reason}")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Ray ships exceptions between processes by pickling them; the default reduce
        # would call __init__ with the single formatted message and fail.
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True)
class ImageLimits:
    """Per-call limits for :func:`decode_image`.

    ``max_pixels`` is width * height of the first frame. Values above Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` (about 89 million) have no effect: Pillow's bomb guard,
    which is turned into an error here, fires first.
    """

    max_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    min_side: int = 8
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValue(f"ImageLimits.{name} must be a positive int, got {value!r}")
        if isinstance(self.formats, str) or not self.formats:
            raise InvalidValue(f"ImageLimits.formats must be a non-empty tuple of names, got {self.formats!r}")
        formats = tuple(str(f).upper() for f in self.formats)
        # Catch typos such as "JPG" when the limits are built, not on the first request.
        Image.init()
        unknown = [f for f in formats if f not in Image.OPEN]
        if unknown:
            raise InvalidValue(f"ImageLimits.formats has formats Pillow cannot open: {', '.join(unknown)}")
        object.__setattr__(self, "formats", formats)


_DEFAULT_LIMITS = ImageLimits()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of raw bytes; the cache key for a reference image's content."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, source: str = "<bytes>", limits: ImageLimits = _DEFAULT_LIMITS) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB image, enforcing ``limits``.

    Only the first frame of animated images is used. Raises :class:`ImageDecodeError`
    for every input that cannot be used.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise _reject(source, "empty file")
    if len(data) > limits.max_bytes:
        raise _reject(source, f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")

    # catch_warnings changes the process-wide warning filters for the duration; that is
    # the only way to make Pillow's bomb *warning* fatal without touching MAX_IMAGE_PIXELS.
    # Our own max_pixels check below is what normally fires first, so a filter briefly
    # raced by another thread only loses this second line of defence.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open_header(data, source, limits)
        try:
            _check_dimensions(img, source, limits)
            _load_pixels(img, source)
            upright = _exif_transpose(img, source)
            rgb = _to_rgb(upright)
        finally:
            img.close()
    logger.debug("decoded image %r: %s %dx%d", source, img.format, rgb.width, rgb.height)
    return rgb


def load_image_file(path: str | os.PathLike[str], limits: ImageLimits = _DEFAULT_LIMITS) -> Image.Image:
    """Read a local image file and decode it with :func:`decode_image`."""
    source = os.fspath(path)
    try:
        size = os.stat(source).st_size
        # Refuse before reading so a huge file never lands in memory.
        if size > limits.max_bytes:
            raise _reject(source, f"{size} bytes exceeds the limit of {limits.max_bytes}")
        with open(source, "rb") as fh:
            # Read one byte past the limit: files that grow, pipes and /proc files report
            # a size that cannot be trusted, and decode_image then rejects the excess.
            data = fh.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise _reject(source, "file not found") from None
    except IsADirectoryError:
        raise _reject(source, "is a directory, not a file") from None
    except PermissionError:
        raise _reject(source, "permission denied") from None
    except OSError as exc:
        raise _reject(source, f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, source=source, limits=limits)


def prepare_reference(
    image: Image.Image,
    resolution: int | tuple[int, int] = 512,
    mode: PreprocessMode = "resize",
) -> Image.Image:
    """Bring a decoded reference image to the model's input size.

    ``resolution`` is a side length or ``(height, width)``; both must be positive
    multiples of 8 (the VAE downsamples by 8).

    * ``"resize"``: plain bilinear resize to the target size, as the official DreamCache
      preprocessing does; the aspect ratio may distort.
    * ``"pad"``: keep the aspect ratio, scale the longer side to fit, and centre the
      result on a white canvas.
    """
    height, width = _parse_resolution(resolution)
    rgb = _to_rgb(image)
    if mode == "resize":
        return rgb.resize((width, height), Image.Resampling.BILINEAR)
    if mode == "pad":
        return _pad_to(rgb, width, height)
    raise InvalidValue(f"mode must be 'resize' or 'pad', got {mode!r}")


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack same-sized images into a float32 ``[N, 3, H, W]`` tensor in ``[-1, 1]``."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("to_tensor needs at least one image")
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        raise ValueError(f"to_tensor needs images of one size, got sizes (w, h) {sorted(sizes)}")
    return pixels_to_input(np.stack([np.asarray(_to_rgb(img), dtype=np.uint8) for img in images]))


# uint8 [0, 255] -> [-1, 1], the range the diffusers VAE expects. A 256-entry table, computed once with the float32
# arithmetic the PIL path always used, makes the conversion a gather: bit-identical on every device (a CUDA
# division by a scalar is a multiplication by its reciprocal, which rounds differently).
_PIXEL_VALUES = np.arange(256, dtype=np.uint8).astype(np.float32) / 127.5 - 1.0


def pixels_to_input(
    pixels: np.ndarray,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Prepared references as uint8 ``[N, H, W, 3]`` (RGB, already at the model's size) -> the model's input,
    ``[N, 3, H, W]`` in ``[-1, 1]`` (float32 unless ``dtype``), on ``device`` (default: the CPU).

    Bit-identical to :func:`to_tensor` of the same pixels as PIL images, then ``.to(device, dtype)``. The uint8
    pixels cross to the device (a quarter of the float32 bytes), from pinned memory without blocking on CUDA, and
    are converted there.
    """
    import torch

    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"pixels_to_input needs a uint8 [N, H, W, 3] array, got {got}")
    if pixels.shape[0] == 0:
        raise ValueError("pixels_to_input needs at least one image")
    device = torch.device(device or "cpu")
    with warnings.catch_warnings():
        # A read-only array (np.frombuffer over the bytes a job stage passed on) is only ever read below: the
        # reorder and the gather write new tensors. torch warns about every such array; copying it would cost more.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        host = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type == "cuda":  # CPU-only torch cannot pin: only here
        host = host.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    channels_first = host.permute(0, 3, 1, 2).contiguous()  # on uint8: a quarter of the bytes to move
    table = torch.from_numpy(_PIXEL_VALUES).to(device, dtype or torch.float32)  # a cast commutes with the gather
    return table.index_select(0, channels_first.reshape(-1).int()).view(channels_first.shape)


# --- decoding steps ------------------------------------------------------------------


def _reject(source: str, reason: str) -> ImageDecodeError:
    logger.debug("rejected image %r: %s", source, reason)
    return ImageDecodeError(source, reason)


def _open_header(data: bytes, source: str, limits: ImageLimits) -> Image.Image:
    """Parse only the header, with just the accepted formats' parsers."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise _refusal_for_unidentified(data, source, limits) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _reject(source, f"too many pixels (decompression bomb guard): {exc}") from None
    except _CORRUPT_DATA_ERRORS as exc:
        raise _reject(source, f"corrupt image header: {exc}") from None
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format)
    if fmt not in limits.formats:  # e.g. a plugin that hands back another format's class
        img.close()
        raise _reject(source, _format_refusal(img.format, limits))
    return img


def _refusal_for_unidentified(data: bytes, source: str, limits: ImageLimits) -> ImageDecodeError:
    """Tell "a real image in a refused format" apart from "not an image at all"."""
    # Only on the failure path: look at the header with every parser, to name the format.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                found = probe.format
    except (Image.DecompressionBombError, *_CORRUPT_DATA_ERRORS):
        found = None
    if found is None:
        return _reject(source, "not an image (no accepted image header found)")
    return _reject(source, _format_refusal(found, limits))


def _format_refusal(found: str | None, limits: ImageLimits) -> str:
    return f"format {found} is not accepted; accepted: {', '.join(limits.formats)}"


def _check_dimensions(img: Image.Image, source: str, limits: ImageLimits) -> None:
    """Judge the size the header declares, before any pixel is decoded."""
    width, height = img.size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise _reject(
            source, f"{width}x{height} = {pixels} pixels exceeds the limit of {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise _reject(source, f"{width}x{height} is too small; each side must be at least {limits.min_side} pixels")


def _load_pixels(img: Image.Image, source: str) -> None:
    """Decode the first frame fully now, so truncation surfaces here and not later."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _reject(source, f"too many pixels (decompression bomb guard): {exc}") from None
    except _CORRUPT_DATA_ERRORS as exc:
        raise _reject(source, f"truncated or corrupt image data: {exc}") from None


def _exif_transpose(img: Image.Image, source: str) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block costs the rotation, not the image."""
    try:
        upright = ImageOps.exif_transpose(img)
    except _CORRUPT_DATA_ERRORS as exc:
        logger.warning("ignoring unreadable EXIF orientation in %r: %s", source, exc)
        upright = img
    # Always hand back an image detached from the opened file, which is closed next.
    return img.copy() if upright is img else upright


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Going through RGBA turns P/L/RGB "transparency" entries into a real alpha band.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    # L, 1, P without transparency, CMYK, YCbCr, F: Pillow's conversions are right here.
    return img.convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit samples to 8 bits (x/257) instead of clipping them at 255."""
    samples = np.asarray(img).astype(np.float32)
    gray = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
    transparent_value = img.info.get("transparency")
    if isinstance(transparent_value, int):
        # PNG tRNS on 16-bit gray names one exact sample value as fully transparent.
        gray = np.where(samples == transparent_value, np.uint8(_BACKGROUND[0]), gray)
    return Image.fromarray(gray, mode="L").convert("RGB")


# --- preprocessing helpers -----------------------------------------------------------


def _parse_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """Return (height, width), rejecting sizes the latent grid cannot represent."""
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise InvalidValue(f"resolution must be an int or (height, width), got {resolution!r}")
        height, width = resolution
    else:
        height = width = resolution
    for side in (height, width):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
            raise InvalidValue(f"resolution sides must be ints, got {resolution!r}")
        if side <= 0 or side % 8:
            raise InvalidValue(f"resolution sides must be positive multiples of 8, got {resolution!r}")
    return int(height), int(width)


def _pad_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width x height keeping the aspect ratio, centred on white."""
    scale = min(width / img.width, height / img.height)
    new_w = min(width, max(1, round(img.width * scale)))
    new_h = min(height, max(1, round(img.height * scale)))
    scaled = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas
