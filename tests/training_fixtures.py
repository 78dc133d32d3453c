"""Synthetic training triplets for the training and triplet tests: coloured shapes on backgrounds, with masks.

Imported by the test modules (tests/ is on sys.path); no fixtures are registered here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 130, 20), "cyan": (30, 200, 210), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def shape_triplet(rng: np.random.Generator, size: int = 64, background: tuple[int, int, int] | None = None,
                  side_range: tuple[float, float] = (1 / 3, 1 / 2)):
    """(target image, mask image, caption, shape colour) with a random shape, colour, place and background.

    ``side_range`` bounds the shape's side as fractions of the canvas."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(COLOURS)
    colour_name = names[int(rng.integers(len(names)))]
    if background is None:
        background = tuple(int(v) for v in rng.integers(90, 200, size=3))
    target = Image.new("RGB", (size, size), background)
    mask = Image.new("L", (size, size), 0)
    side = int(rng.integers(int(side_range[0] * size), int(side_range[1] * size) + 1))
    left, top = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    box = (left, top, left + side, top + side)
    for canvas, fill in ((ImageDraw.Draw(target), COLOURS[colour_name]), (ImageDraw.Draw(mask), 255)):
        if shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif shape == "square":
            canvas.rectangle(box, fill=fill)
        else:
            canvas.polygon([(left, top + side), (left + side, top + side), (left + side // 2, top)], fill=fill)
    return target, mask, f"a {colour_name} {shape}", COLOURS[colour_name]


def shape_rows(count: int, seed: int = 0, size: int = 64, **kwargs) -> list[dict]:
    """Rows in the triplet format (PIL images; write_triplets stores them as PNG)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        target, mask, caption, _ = shape_triplet(rng, size, **kwargs)
        rows.append({"id": f"s{seed}-{i:05d}", "caption": caption, "target": target, "mask": mask})
    return rows


def write_learning_model(folder) -> str:
    """The tiny model with its VAE's scaling factor calibrated to unit latent spread, as SD's 0.18215 was.

    The random tiny VAE's raw latents have a std of about 0.2, so at 0.18215 every image encodes to nearly zero and
    the reference carries no signal a test could measure. Calibrating the factor (a config value, like SD's own)
    gives latents of unit spread; the weights are unchanged."""
    import json
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL

    from dreamcache.images import to_tensor
    from dreamcache.models import write_tiny_model

    root = write_tiny_model(folder)
    vae = AutoencoderKL.from_pretrained(root / "vae")
    images = [row["target"] for row in shape_rows(32, seed=12345, background=(255, 255, 255), side_range=(0.6, 0.9))]
    with torch.no_grad():
        spread = float(vae.encode(to_tensor(images)).latent_dist.mean.std())
    config_path = Path(root) / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 1.0 / spread
    config_path.write_text(json.dumps(config, indent=2))
    return str(root)
