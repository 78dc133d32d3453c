"""Training triplets: the Parquet format, a resumable streaming reader, and the reference construction of spec 3.2.

**Format.** One or more Parquet files (a file, or every ``*.parquet`` under a folder or s3:// prefix), one row
per triplet:

    caption       string   the target's caption (null reads as "")
    target        binary   the target image (PNG/JPEG/WebP bytes)       -- or target_uri: string (path/s3 URI)
    mask          binary   foreground mask of the target (grayscale, white = subject) -- or mask_uri
    reference     binary   an explicit reference image (used instead of a mask)       -- or reference_uri
    id            string   optional; names the row in logs and seeds its augmentation

Every row needs a target and a mask or a reference. Small row groups (``write_triplets`` uses 64 rows) keep the
reader's memory at one row group and let it shuffle at row-group granularity.

**Reference construction** (spec 3.2, the official ``GenDataset``): the mask paints the background white, the
image is cropped to the mask's bounding box, rescaled to a width of 70-100 % of the canvas (aspect kept, clamped to
the canvas) and pasted at a uniformly random place on a white canvas; then a horizontal flip (p 0.5), colour
jitter (p 0.1; brightness/contrast/saturation 0.2, hue 0.05) and a white random erasing (p 0.4, area 2-25 %).
One deviation: the official code jitters the [-1, 1] tensor, which clamps every dark pixel to mid-grey in those
10 % of samples; here the jitter acts on the image itself. An explicit reference is resized to the canvas
(bilinear, as at inference) and gets the flip, jitter and erasing. The caption is dropped (-> "") with p 0.07.

Every random choice of a row comes from a generator seeded by (seed, epoch, row key), so a resumed run sees
exactly the samples, augmentations and order of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageEnhance

from . import storage
from .errors import InvalidValue
from .images import ImageDecodeError, ImageLimits, decode_image, prepare_reference
from .training_config import ReferenceAugment  # noqa: F401 - re-exported: it is the triplets' augmentation

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255)
IMAGE_COLUMNS = ("target", "mask", "reference")
TRIPLET_SCHEMA_FIELDS = (
    ("id", "string"), ("caption", "string"),
    ("target", "binary"), ("target_uri", "string"),
    ("mask", "binary"), ("mask_uri", "string"),
    ("reference", "binary"), ("reference_uri", "string"),
)
DEFAULT_ROW_GROUP_SIZE = 64


class TripletError(InvalidValue):
    """A triplet row that cannot be used (missing image, unreadable bytes, empty mask, ...)."""


# -- reference construction (spec 3.2) ---------------------------------------------------------------------------
NO_AUGMENT = ReferenceAugment(min_width_fraction=1.0, flip_p=0.0, jitter_p=0.0, erase_p=0.0)


def foreground_mask(mask: Image.Image, size: tuple[int, int], source: str = "mask") -> np.ndarray:
    """A boolean foreground mask (white = subject) at the target's ``size`` (width, height)."""
    if mask.size != size:  # masks stored at another resolution: nearest keeps them binary
        mask = mask.resize(size, Image.Resampling.NEAREST)
    fg = np.asarray(mask.convert("L")) > 127
    if not fg.any():
        raise TripletError(f"{source}: the mask has no foreground pixel")
    return fg


def cut_out_foreground(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Background painted white, then cropped to the mask's bounding box."""
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = WHITE
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return Image.fromarray(pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def place_on_canvas(foreground: Image.Image, size: int, rng: np.random.Generator, min_width_fraction: float) -> Image.Image:
    """The official ``RandomResizeForeground``: width uniform in [fraction * size, size], aspect kept and clamped to
    the canvas, pasted at a uniformly random position on white."""
    aspect = foreground.width / foreground.height
    width = int(rng.integers(int(min_width_fraction * size), size + 1))
    height = int(width / aspect)
    if height > size:
        height = size
        width = int(height * aspect)
    width, height = max(1, min(width, size)), max(1, min(height, size))
    canvas = Image.new("RGB", (size, size), WHITE)
    left = int(rng.integers(0, size - width + 1))
    top = int(rng.integers(0, size - height + 1))
    canvas.paste(foreground.resize((width, height), Image.Resampling.BICUBIC), (left, top))
    return canvas


def color_jitter(image: Image.Image, rng: np.random.Generator, augment: ReferenceAugment) -> Image.Image:
    """torchvision ColorJitter on a PIL image: the four adjustments in a random order, factors uniform."""
    for op in rng.permutation(4):
        if op == 0 and augment.brightness:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - augment.brightness, 1 + augment.brightness))
        elif op == 1 and augment.contrast:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - augment.contrast, 1 + augment.contrast))
        elif op == 2 and augment.saturation:
            image = ImageEnhance.Color(image).enhance(rng.uniform(1 - augment.saturation, 1 + augment.saturation))
        elif op == 3 and augment.hue:
            hsv = np.asarray(image.convert("HSV")).copy()
            shift = np.uint8(int(rng.uniform(-augment.hue, augment.hue) * 255) % 256)
            hsv[..., 0] = hsv[..., 0] + shift  # uint8 arithmetic wraps around the hue circle
            image = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return image


def random_erase(pixels: np.ndarray, rng: np.random.Generator, augment: ReferenceAugment) -> np.ndarray:
    """torchvision RandomErasing(value=1 on [-1, 1]): a white rectangle of 2-25 % of the area, up to 10 tries."""
    height, width = pixels.shape[:2]
    area = height * width
    log_ratio = (math.log(augment.erase_ratio[0]), math.log(augment.erase_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*augment.erase_area)
        ratio = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if h < height and w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            pixels = pixels.copy()
            pixels[top : top + h, left : left + w] = WHITE
            return pixels
    return pixels


def augment_reference(canvas: Image.Image, rng: np.random.Generator, augment: ReferenceAugment) -> np.ndarray:
    """Flip, colour jitter and random erasing of a reference already on its canvas."""
    if rng.random() < augment.flip_p:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < augment.jitter_p:
        canvas = color_jitter(canvas, rng, augment)
    pixels = np.asarray(canvas.convert("RGB"))
    if rng.random() < augment.erase_p:
        pixels = random_erase(pixels, rng, augment)
    return pixels


def build_reference(target: Image.Image, mask: np.ndarray, size: int, rng: np.random.Generator,
                    augment: ReferenceAugment = ReferenceAugment()) -> np.ndarray:
    """The training reference of spec 3.2 from a target image and its foreground mask: ``[size, size, 3]`` uint8."""
    canvas = place_on_canvas(cut_out_foreground(target, mask), size, rng, augment.min_width_fraction)
    return augment_reference(canvas, rng, augment)


def prepare_target(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bilinear, torchvision Resize's default), centre crop to a square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)).convert("RGB"))


# -- one row -> one training sample --------------------------------------------------------------------------------
@dataclass
class PreparedTriplet:
    target: np.ndarray  # [H, W, 3] uint8
    reference: np.ndarray  # [H, W, 3] uint8
    caption: str


def row_key(row: Mapping) -> str:
    """A stable name for a row: its id, else its target URI, else a hash of the target bytes."""
    if row.get("id"):
        return str(row["id"])
    if row.get("target_uri"):
        return str(row["target_uri"])
    data = row.get("target")
    if isinstance(data, Image.Image):
        data = data.tobytes()
    return hashlib.sha256(data).hexdigest()[:32] if data else "<no target>"


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator for every random choice about one row in one epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _image_bytes(row: Mapping, name: str) -> tuple[bytes, str] | None:
    if row.get(name) is not None:
        return bytes(row[name]), f"{row_key(row)}:{name}"
    uri = row.get(f"{name}_uri")
    if uri:
        try:
            return storage.read_bytes(uri), uri
        except storage.StorageError as exc:
            raise TripletError(f"{row_key(row)}: cannot read {name} ({exc})") from None
    return None


def _decode(row: Mapping, name: str, limits: ImageLimits) -> Image.Image | None:
    if isinstance(row.get(name), Image.Image):  # rows built in memory (tests, notebooks) may hold images
        return row[name].convert("RGB")
    found = _image_bytes(row, name)
    if found is None:
        return None
    data, source = found
    try:
        return decode_image(data, source, limits)
    except ImageDecodeError as exc:
        raise TripletError(str(exc)) from None


def prepare_triplet(row: Mapping, resolution: int, rng: np.random.Generator,
                    augment: ReferenceAugment = ReferenceAugment(), caption_dropout: float = 0.07,
                    limits: ImageLimits = ImageLimits()) -> PreparedTriplet:
    """Decode a row and build (target, reference, caption) at ``resolution``; raises TripletError for a bad row."""
    target = _decode(row, "target", limits)
    if target is None:
        raise TripletError(f"{row_key(row)}: no target image (needs a 'target' or 'target_uri' value)")
    caption = row.get("caption") or ""
    if rng.random() < caption_dropout:
        caption = ""  # trains the text-free branch of classifier-free guidance
    target_pixels = prepare_target(target, resolution)
    mask = _decode(row, "mask", limits)
    if mask is not None:
        # Cut from the full-resolution target, as the official code does: the subject keeps its detail.
        fg = foreground_mask(mask, target.size, f"{row_key(row)}:mask")
        reference = build_reference(target, fg, resolution, rng, augment)
    else:
        given = _decode(row, "reference", limits)
        if given is None:
            raise TripletError(f"{row_key(row)}: needs a mask or a reference image")
        reference = augment_reference(prepare_reference(given, resolution, "resize"), rng, augment)
    return PreparedTriplet(target_pixels, reference, caption)


@dataclass
class TripletBatch:
    """A training batch: images as float tensors in [-1, 1], ``[B, 3, H, W]``."""

    target: torch.Tensor
    reference: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> TripletBatch:
        return TripletBatch(self.target.pin_memory(), self.reference.pin_memory(), self.captions)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def collate(samples: Sequence[PreparedTriplet]) -> TripletBatch:
    return TripletBatch(
        target=pixels_to_tensor(np.stack([s.target for s in samples])),
        reference=pixels_to_tensor(np.stack([s.reference for s in samples])),
        captions=[s.caption for s in samples],
    )


# -- writing ---------------------------------------------------------------------------------------------------
def _arrow_schema():
    return pa.schema([(name, pa.string() if kind == "string" else pa.binary()) for name, kind in TRIPLET_SCHEMA_FIELDS])


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_triplets(rows: Iterable[Mapping], uri: str, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> int:
    """Write triplet rows (dicts with the format's columns; absent ones are null) to one Parquet file at ``uri``.

    PIL images are accepted for the image columns and stored as PNG. The file is written whole. Returns the row count.
    """

    names = [name for name, _ in TRIPLET_SCHEMA_FIELDS]
    columns: dict[str, list] = {name: [] for name in names}
    for row in rows:
        unknown = set(row) - set(names)
        if unknown:
            raise InvalidValue(f"unknown triplet columns {sorted(unknown)}; the format has {names}")
        for name in names:
            value = row.get(name)
            columns[name].append(image_bytes(value) if isinstance(value, Image.Image) else value)
    table = pa.table(columns, schema=_arrow_schema())
    storage.write_parquet(uri, table, row_group_size=row_group_size)
    return table.num_rows


# -- reading: a resumable, shuffled, infinite stream ---------------------------------------------------------------
def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a dataset URI: the file itself, or every ``*.parquet`` under the folder/prefix."""
    if uri.endswith(".parquet") and storage.exists(uri):
        return [uri]
    files = [f for f in storage.list_files(uri) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no Parquet files at {uri}")
    return files


def check_triplet_schema(names: Sequence[str], source: str) -> None:
    present = set(names)
    if not present & {"target", "target_uri"}:
        raise TripletError(f"{source}: a triplet dataset needs a 'target' or 'target_uri' column (has {sorted(present)})")
    if not present & {"mask", "mask_uri", "reference", "reference_uri"}:
        raise TripletError(f"{source}: a triplet dataset needs a mask or reference column (has {sorted(present)})")


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: the next row is row ``row`` of unit ``unit`` in epoch ``epoch``'s unit order."""

    epoch: int = 0
    unit: int = 0
    row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> StreamPosition:
        return cls(**{k: int(v) for k, v in (data or {}).items() if k in ("epoch", "unit", "row")})


@dataclass(frozen=True)
class _Unit:
    file: int
    row_group: int
    rows: int


@dataclass
class TripletStream:
    """Rows of a triplet dataset, forever, epoch after epoch.

    Each epoch visits every row group of every file in a seeded random order and every row group's rows in a
    seeded random order, so memory stays at one row group and any position can be resumed without reading what
    came before it.
    """

    uri: str
    seed: int = 0
    shuffle: bool = True
    files: list[str] = field(init=False)
    units: list[_Unit] = field(init=False)

    def __post_init__(self) -> None:
        self.files = parquet_files(self.uri)
        self.units = []
        for index, file_uri in enumerate(self.files):
            meta = self._open(file_uri).metadata
            check_triplet_schema(meta.schema.to_arrow_schema().names, file_uri)
            self.units += [_Unit(index, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                           if meta.row_group(g).num_rows > 0]
        if not self.units:
            raise TripletError(f"{self.uri}: the triplet dataset has no rows")

    def __len__(self) -> int:
        return sum(unit.rows for unit in self.units)

    @staticmethod
    def _open(file_uri: str):
        fs, path = storage.pyarrow_filesystem(file_uri)
        return pq.ParquetFile(fs.open_input_file(path))

    def unit_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.units)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.units))]

    def row_order(self, epoch: int, unit: int) -> list[int]:
        rows = self.units[unit].rows
        if not self.shuffle:
            return list(range(rows))
        return [int(i) for i in np.random.default_rng([self.seed, epoch, unit, 1]).permutation(rows)]

    def rows(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[dict, int, StreamPosition]]:
        """Yield ``(row, its epoch, position after it)``; resuming at that position continues with the next row."""
        epoch, first_unit, first_row = start.epoch, start.unit, start.row
        open_file: tuple[int, object] | None = None
        while True:
            order = self.unit_order(epoch)
            for slot in range(first_unit, len(order)):
                unit = self.units[order[slot]]
                if open_file is None or open_file[0] != unit.file:
                    open_file = (unit.file, self._open(self.files[unit.file]))
                records = open_file[1].read_row_group(unit.row_group).to_pylist()
                rows = self.row_order(epoch, order[slot])
                for i in range(first_row, len(rows)):
                    after = StreamPosition(epoch, slot, i + 1) if i + 1 < len(rows) else (
                        StreamPosition(epoch, slot + 1, 0) if slot + 1 < len(order) else StreamPosition(epoch + 1, 0, 0))
                    yield records[rows[i]], epoch, after
                first_row = 0
            epoch, first_unit = epoch + 1, 0
