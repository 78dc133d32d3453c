"""A small procedural world where personalization is visible: toys with an identity, scenes that set the context.

**Subjects.** Nine toys, each a colour x shape x white marking. Colours and shapes form a 3 x 3 grid and the
marking is ``(colour + shape) mod 3``, so any two toys differ in at least two of the three attributes (a toy that
shares a colour with another has another shape *and* another marking). Ids read like ``red-circle-stripe``.

**Contexts.** A prompt names a scene (the background: grass, sea, night, road) and a position (left, middle,
right): ``"a toy on the grass on the left"``. The caption never names the toy's identity, so the text alone cannot
say which toy to draw: only a reference (the feature cache) can. That is what makes the no-cache baseline fall to
chance on identity while it still follows the context.

**Images.** Rendered with PIL at 4x and box-downsampled to ``SIZE`` (32 px) so edges are anti-aliased. A target
is a toy in a scene (size and placement jittered); a reference is the toy alone, large and centred on white (the
training references are cut out of the targets by ``dreamcache.triplets``, as in the paper's data, spec 3.2).
Everything is a pure function of its seed.

**Scoring** (:func:`score`), with a descriptor simple enough to read:

* context: the scene is the nearest scene colour to the median of the image's 2-pixel border; the position is the
  nearest of the three anchors to the foreground's centroid (foreground = pixels farther than
  ``FOREGROUND_DISTANCE`` from the detected background colour).
* identity: the descriptor of an image is a coarse colour histogram of its foreground (4 bins per RGB channel,
  normalised) next to its foreground mask cropped to its bounding box and resized to 8 x 8 (so shape and the
  white marking, which is a hole in the mask, both count). A generated image is identified as the subject whose
  reference descriptor is nearest (L2). Chance is 1/9.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InvalidValue

logger = logging.getLogger(__name__)

SIZE = 32  # pixels: the toy model's native resolution
SUPERSAMPLE = 4
WHITE = (255, 255, 255)
MARKING_RGB = (250, 250, 250)

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "yellow": (240, 210, 40), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle")
MARKINGS = ("stripe", "dot", "cross")
# Scene colours are far from every toy colour and from the references' white, so the border says the scene.
SCENES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "grass": ("on the grass", (60, 150, 60)),
    "sea": ("in the sea", (40, 100, 190)),
    "night": ("at night", (25, 25, 60)),
    "road": ("on the road", (125, 125, 125)),
}
POSITIONS: dict[str, tuple[str, float]] = {  # phrase, horizontal centre as a fraction of the width
    "left": ("on the left", 0.28),
    "middle": ("in the middle", 0.5),
    "right": ("on the right", 0.72),
}
NOUN = "toy"
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour beyond which a pixel is foreground
WHITE_LEVEL = 190  # a pixel whose every channel exceeds this is white (the marking)


@dataclass(frozen=True)
class Subject:
    colour: str
    shape: str
    marking: str

    @property
    def id(self) -> str:
        return f"{self.colour}-{self.shape}-{self.marking}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


SUBJECTS: tuple[Subject, ...] = tuple(
    Subject(colour, shape, MARKINGS[(i + j) % len(MARKINGS)])
    for i, colour in enumerate(COLOURS) for j, shape in enumerate(SHAPES)
)
SUBJECT_IDS: tuple[str, ...] = tuple(s.id for s in SUBJECTS)


def subject(subject_id: str) -> Subject:
    for s in SUBJECTS:
        if s.id == subject_id:
            return s
    raise InvalidValue(f"unknown toy-world subject {subject_id!r}; known: {', '.join(SUBJECT_IDS)}")


def prompt(scene: str, position: str) -> str:
    return f"a {NOUN} {SCENES[scene][0]} {POSITIONS[position][0]}"


# The evaluation and demo prompts: every scene, every position.
PROMPTS: tuple[str, ...] = tuple(prompt(scene, position) for scene in SCENES for position in POSITIONS)
VOCABULARY: tuple[str, ...] = tuple(sorted({word for p in PROMPTS for word in p.split()}))


def parse_prompt(text: str) -> tuple[str | None, str | None]:
    """The (scene, position) a prompt asks for; None for a part it does not name."""
    scene = next((name for name, (phrase, _) in SCENES.items() if phrase in text), None)
    position = next((name for name, (phrase, _) in POSITIONS.items() if phrase in text), None)
    return scene, position


# -- rendering --------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, box: tuple[float, float, float, float], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _marking_mask(toy: Subject, box: tuple[float, float, float, float], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = box
    side = right - left
    # The triangle's centroid sits lower than its box centre: markings centre there so they stay inside.
    cx, cy = (left + right) / 2, top + side * (2 / 3 if toy.shape == "triangle" else 1 / 2)
    width = side * 0.2
    if toy.marking == "stripe":
        draw.rectangle((left, cy - width / 2, right, cy + width / 2), fill=255)
    elif toy.marking == "dot":
        r = side * 0.16
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif toy.marking == "cross":
        arm = side * 0.3
        draw.line((cx - arm, cy - arm, cx + arm, cy + arm), fill=255, width=max(1, round(width * 0.8)))
        draw.line((cx - arm, cy + arm, cx + arm, cy - arm), fill=255, width=max(1, round(width * 0.8)))
    return mask


def render(toy: Subject, background: tuple[int, int, int], centre: tuple[float, float], side: float,
           size: int = SIZE) -> tuple[Image.Image, Image.Image]:
    """(image, foreground mask) of one toy: ``centre`` and ``side`` as fractions of the canvas."""
    big = size * SUPERSAMPLE
    half = side * big / 2
    cx, cy = centre[0] * big, centre[1] * big
    box = (cx - half, cy - half, cx + half, cy + half)
    shape = _shape_mask(toy.shape, box, big)
    marking = Image.fromarray(np.minimum(np.asarray(_marking_mask(toy, box, big)), np.asarray(shape)))
    image = Image.new("RGB", (big, big), background)
    image.paste(Image.new("RGB", (big, big), toy.rgb), mask=shape)
    image.paste(Image.new("RGB", (big, big), MARKING_RGB), mask=marking)
    return image.resize((size, size), Image.Resampling.BOX), shape.resize((size, size), Image.Resampling.BOX)


def reference_image(toy: Subject, size: int = SIZE) -> Image.Image:
    """The toy alone, large and centred on white: the reference a user would upload."""
    return render(toy, WHITE, (0.5, 0.5), 0.8, size)[0]


@dataclass(frozen=True)
class Scene:
    """One target: which toy, where, how big."""

    toy: Subject
    scene: str
    position: str
    centre: tuple[float, float]
    side: float

    @property
    def caption(self) -> str:
        return prompt(self.scene, self.position)


def draw_scene(rng: np.random.Generator) -> Scene:
    toy = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
    scene = list(SCENES)[int(rng.integers(len(SCENES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    side = float(rng.uniform(0.4, 0.52))
    centre = (POSITIONS[position][1] + float(rng.uniform(-0.04, 0.04)), 0.5 + float(rng.uniform(-0.12, 0.12)))
    return Scene(toy, scene, position, centre, side)


def render_scene(item: Scene, size: int = SIZE) -> tuple[Image.Image, Image.Image]:
    return render(item.toy, SCENES[item.scene][1], item.centre, item.side, size)


def triplet_rows(count: int, seed: int = 0, size: int = SIZE) -> list[dict]:
    """``count`` training rows in the project's triplet format (``dreamcache.triplets``): caption, target, mask.

    The mask lets the training data path build each reference from its own target (cut out, rescaled, placed on
    white, augmented), exactly as for the paper's synthetic data."""
    rng = np.random.default_rng([seed, 12])
    rows = []
    for i in range(count):
        item = draw_scene(rng)
        target, mask = render_scene(item, size)
        rows.append({"id": f"toy-{seed}-{i:06d}", "caption": item.caption, "target": target, "mask": mask})
    return rows


def white_background_views(count: int, seed: int = 0, size: int = SIZE) -> list[Image.Image]:
    """Toys alone on white at random sizes and places: what references look like to the VAE (which must encode
    them as well as scenes: the caching pass runs every reference through it)."""
    rng = np.random.default_rng([seed, 13])
    views = []
    for _ in range(count):
        toy = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
        side = float(rng.uniform(0.4, 0.9))
        centre = tuple(float(v) for v in rng.uniform(side / 2, 1 - side / 2, size=2))
        views.append(render(toy, WHITE, centre, side, size)[0])
    return views


def write_triplets(path: str | Path, count: int, seed: int = 0) -> int:
    """The world's triplets as one Parquet file (what ``dreamcache train-adapters`` reads)."""
    from .triplets import write_triplets as write

    return write(triplet_rows(count, seed), str(path))


def references(subject_ids: Iterable[str], out_dir: str | Path, size: int = SIZE) -> list[Path]:
    """Write each subject's reference as ``<out_dir>/<subject_id>/ref.png`` (the caching catalog layout)."""
    paths = []
    for subject_id in subject_ids:
        folder = Path(out_dir) / subject_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "ref.png"
        reference_image(subject(subject_id), size).save(path)
        paths.append(path)
    return paths


# -- scoring ------------------------------------------------------------------------------------------------------
def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)


def background_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def foreground(pixels: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pixels - background_colour(pixels), axis=-1) > FOREGROUND_DISTANCE


def detect_scene(image: Image.Image) -> str:
    colour = background_colour(_pixels(image))
    return min(SCENES, key=lambda name: float(np.linalg.norm(colour - np.array(SCENES[name][1]))))


def detect_position(image: Image.Image) -> str | None:
    fg = foreground(_pixels(image))
    if not fg.any():
        return None
    x = float(np.nonzero(fg)[1].mean() + 0.5) / SIZE
    return min(POSITIONS, key=lambda name: abs(x - POSITIONS[name][1]))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region not connected to the image border filled (the toy's white marking, on white)."""
    outside = ~mask
    reach = np.zeros_like(mask)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = outside[0], outside[-1], outside[:, 0], outside[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= outside
        if (grown == reach).all():
            return ~reach
        reach = grown


def _grid(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((8, 8), Image.Resampling.BOX), dtype=np.float32).reshape(-1) / 255.0


def descriptor(image: Image.Image) -> np.ndarray:
    """Colour ++ shape ++ marking of an image's toy, each about equally weighted.

    colour: histogram (4 bins per RGB channel, normalised) of the toy's body pixels (foreground, not white);
    shape: the toy's silhouette (foreground with holes filled) cropped to its bounding box, at 8 x 8;
    marking: the near-white pixels inside the silhouette, on the same 8 x 8 grid."""
    pixels = _pixels(image)
    body = fill_holes(foreground(pixels))
    if not body.any():
        return np.zeros(64 * 3, dtype=np.float32)
    white = (pixels.min(axis=-1) > WHITE_LEVEL) & body
    coloured = body & ~white
    hist = np.zeros(64, dtype=np.float32)
    if coloured.any():
        bins = np.clip(pixels[coloured] // 64, 0, 3).astype(int)
        hist = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).astype(np.float32)
        hist /= hist.sum()
    rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    # Weights: a histogram has L2 norm <= 1, an 8 x 8 mask up to 8: scale the masks so each part counts alike.
    return np.concatenate([hist * 2.0, _grid(body, rows, cols) / 4.0, _grid(white, rows, cols) / 2.0])


_REFERENCE_DESCRIPTORS: np.ndarray | None = None


def reference_descriptors() -> np.ndarray:
    global _REFERENCE_DESCRIPTORS
    if _REFERENCE_DESCRIPTORS is None:
        _REFERENCE_DESCRIPTORS = np.stack([descriptor(reference_image(s)) for s in SUBJECTS])
    return _REFERENCE_DESCRIPTORS


def identify(image: Image.Image) -> str:
    """The subject whose reference descriptor is nearest to this image's."""
    distances = np.linalg.norm(reference_descriptors() - descriptor(image), axis=1)
    return SUBJECT_IDS[int(np.argmin(distances))]


@dataclass
class ToyScores:
    """Accuracies over a set of generated images, and what was detected in each."""

    identity_accuracy: float
    colour_accuracy: float  # the identified toy has the subject's colour (identity's easiest part)
    context_accuracy: float  # the asked-for scene (background)
    position_accuracy: float  # the asked-for position (left / middle / right)
    identified: list[str]
    scenes: list[str]
    positions: list[str | None]

    def row(self) -> dict[str, float]:
        return {"identity": self.identity_accuracy, "colour": self.colour_accuracy, "context": self.context_accuracy,
                "position": self.position_accuracy}


def score(images: Sequence[Image.Image], subject_ids: Sequence[str | None], prompts: Sequence[str]) -> ToyScores:
    """Identity, context (scene) and position accuracy of generated images.

    ``subject_ids[i]`` is the subject image i was personalized with (None: not scored for identity);
    ``prompts[i]`` its prompt (the scene and position it asks for)."""
    if not len(images) == len(subject_ids) == len(prompts):
        raise ValueError(f"{len(images)} images, {len(subject_ids)} subject ids, {len(prompts)} prompts: one each")
    if not images:
        raise ValueError("no images to score")
    identified = [identify(im) for im in images]
    scenes = [detect_scene(im) for im in images]
    positions = [detect_position(im) for im in images]
    asked = [parse_prompt(p) for p in prompts]
    id_hits = [got == want for got, want in zip(identified, subject_ids) if want is not None]
    colour_hits = [subject(got).colour == subject(want).colour for got, want in zip(identified, subject_ids)
                   if want is not None]
    scene_hits = [got == want[0] for got, want in zip(scenes, asked) if want[0] is not None]
    position_hits = [got == want[1] for got, want in zip(positions, asked) if want[1] is not None]

    def share(hits: list[bool]) -> float:
        return float(np.mean(hits)) if hits else float("nan")

    return ToyScores(share(id_hits), share(colour_hits), share(scene_hits), share(position_hits), identified, scenes,
                     positions)
