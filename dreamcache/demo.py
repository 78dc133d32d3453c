"""`make demo`: the method end to end on the embedded default (the tiny random-weight model, a local folder).

Makes the tiny model, draws two reference subjects, caches them, and renders a 2x2 prompt x subject grid.
The images are noise (random weights); the data path is the real one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

PROMPTS = ["a photo of a toy on the beach", "a photo of a toy in the snow"]


def draw_subjects(folder: Path) -> dict[str, Path]:
    """Two synthetic references on white: a red ball and a blue box."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"red-ball": ("ellipse", (220, 40, 40)), "blue-box": ("rectangle", (40, 60, 220))}
    paths = {}
    for subject, (shape, colour) in shapes.items():
        image = Image.new("RGB", (256, 256), "white")
        getattr(ImageDraw.Draw(image), shape)((48, 48, 208, 208), fill=colour)
        paths[subject] = folder / f"{subject}.png"
        image.save(paths[subject])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    from .images import load_image_file
    from .models import write_tiny_model
    from .pipeline import DreamCachePipeline

    out = Path(args.out)
    model_dir = write_tiny_model(out / "model")
    references = draw_subjects(out / "references")
    pipe = DreamCachePipeline.from_pretrained(str(model_dir), adapter=str(model_dir / "adapter.safetensors"))

    cache_dir = out / "caches"
    cache_dir.mkdir(parents=True, exist_ok=True)
    caches = {}
    for subject, path in references.items():
        cache = pipe.cache_subject([load_image_file(path)], subject_id=subject)
        (cache_dir / f"{subject}.safetensors").write_bytes(cache.to_bytes())
        caches[subject] = pipe.load_cache(str(cache_dir / f"{subject}.safetensors"))

    # One call renders the whole grid: prompts x subjects, each sample with its own cache.
    grid = [(prompt, subject) for prompt in PROMPTS for subject in caches]
    images = pipe([p for p, _ in grid], [caches[s] for _, s in grid], num_inference_steps=args.steps,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(grid))]).images
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, ((prompt, subject), image) in enumerate(zip(grid, images)):
        image.save(image_dir / f"{subject}-p{PROMPTS.index(prompt)}.png")

    print(f"model:      {model_dir}")
    print(f"references: {out / 'references'}")
    print(f"caches:     {cache_dir} ({len(caches)} subjects)")
    print(f"images:     {image_dir} ({len(images)} = {len(PROMPTS)} prompts x {len(caches)} subjects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
