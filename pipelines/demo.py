"""`make demo`: the system end to end on the embedded default: a local Ray, a local folder as the object
store, the tiny random-weight model.

Makes the tiny model, draws two reference subjects in the catalog layout (<subject_id>/<images>), runs the
caching job (Ray Data) into a cache prefix with its manifest, and renders a 2x2 prompt x subject grid from the
stored caches with the batch generation job, with a contact sheet. The images are noise (random weights);
the data path is the real one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

PROMPTS = ["a photo of a toy on the beach", "a photo of a toy in the snow"]


def draw_subjects(folder: Path) -> list[str]:
    """Two synthetic subjects on white, in the catalog layout: a red ball, and a blue box seen twice."""
    shapes = {"red-ball": [("ellipse", (220, 40, 40))], "blue-box": [("rectangle", (40, 60, 220)), ("rectangle", (30, 50, 200))]}
    for subject, views in shapes.items():
        (folder / subject).mkdir(parents=True, exist_ok=True)
        for i, (shape, colour) in enumerate(views):
            image = Image.new("RGB", (256, 256), "white")
            getattr(ImageDraw.Draw(image), shape)((48 + 10 * i, 48, 208, 208 - 10 * i), fill=colour)
            image.save(folder / subject / f"view{i}.png")
    return sorted(shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    from dreamcache.models import write_tiny_model
    from pipelines.caching import CachingJobConfig, run_caching
    from pipelines.generation import GenerationJobConfig, run_generation, summary_lines
    from pipelines.kernel.ray_runtime import init_ray

    out = Path(args.out).resolve()
    model_dir = write_tiny_model(out / "model")
    subjects = draw_subjects(out / "references")
    cache_dir = out / "caches"

    init_ray()
    summary = run_caching(CachingJobConfig(out=str(cache_dir), model=str(model_dir), images=str(out / "references")))
    print(summary.line())

    # The batch generation job renders the prompt x subject grid from the caching manifest, and a contact sheet.
    generation = run_generation(GenerationJobConfig(
        model=str(model_dir), adapter=str(model_dir / "adapter.safetensors"), caches=str(cache_dir),
        prompts=PROMPTS, seeds=[0], steps=args.steps, out=str(out / "generations"),
    ))
    print("\n".join(summary_lines(generation)))
    print(f"model:         {model_dir}")
    print(f"references:    {out / 'references'}")
    print(f"caches:        {cache_dir} ({len(subjects)} subjects; manifest {summary.manifest_uri})")
    print(f"images:        {out / 'generations'} ({len(PROMPTS)} prompts x {len(subjects)} subjects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
