"""`make demo`: the system end to end on the embedded default: a local Ray, a local folder as the object
store, and the toy world's trained model (``dreamcache/assets/toy_world``, built by ``dreamcache toy-world
build``).

Writes the references of four toy-world subjects in the catalog layout (``references/<subject_id>/ref.png``),
runs the caching job (Ray Data) into a cache prefix with its manifest, then renders a prompt x subject grid from
the stored caches with the batch generation job (``generations/<subject_id>/``), with a contact sheet per subject:
its reference at the head, the run's settings under the title. The captions never name a toy, so what keeps each
subject's colour, shape and marking across the scenes is its cache; the prompts set the scene.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Four toys that differ from each other in colour, shape or marking, and four scenes.
SUBJECTS = ("red-circle-stripe", "yellow-square-cross", "purple-triangle-dot", "red-triangle-cross")
PROMPTS = ("a toy on the grass in the middle", "a toy in the sea on the left", "a toy at night on the right",
           "a toy on the road in the middle")


def main(argv: list[str] | None = None) -> int:
    from dreamcache import toy_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="output folder")
    parser.add_argument("--steps", type=int, default=toy_model.STEPS)
    parser.add_argument("--image-guidance-scale", type=float, default=toy_model.IMAGE_GUIDANCE_SCALE)
    # Joint guidance: the toy adapters carry a subject's colour there (0.81 vs 0.40 compositional at s_I 0.4,
    # docs/toy_world.md); under compositional guidance the demo's four subjects came out alike.
    parser.add_argument("--guidance", choices=["joint", "compositional"], default="joint")
    parser.add_argument("--seeds", type=int, default=2, help="images per subject and prompt")
    args = parser.parse_args(argv)

    from dreamcache import toy_world
    from pipelines.caching import CachingJobConfig, run_caching
    from pipelines.generation import GenerationJobConfig, run_generation, summary_lines
    from pipelines.kernel.ray_runtime import init_ray

    out = Path(args.out).resolve()
    model_dir = toy_model.MODEL_DIR
    toy_world.references(SUBJECTS, out / "references")
    cache_dir = out / "caches"

    init_ray()
    summary = run_caching(CachingJobConfig(out=str(cache_dir), model=str(model_dir), images=str(out / "references")))
    print(summary.line())

    # The batch generation job renders the prompt x subject grid from the caching manifest, and contact sheets.
    generation = run_generation(GenerationJobConfig(
        model=str(model_dir), adapter=str(toy_model.ADAPTER_PATH), caches=str(cache_dir),
        prompts=list(PROMPTS), seeds=list(range(args.seeds)), steps=args.steps,
        guidance_scale=toy_model.GUIDANCE_SCALE, image_guidance_scale=args.image_guidance_scale, guidance=args.guidance,
        out=str(out / "generations"), contact_sheet_cell=96,
    ))
    print("\n".join(summary_lines(generation)))
    print(f"model:         {model_dir} (the toy world's trained model; `dreamcache toy-world build` remakes it)")
    print(f"references:    {out / 'references'}")
    print(f"caches:        {cache_dir} ({len(SUBJECTS)} subjects; manifest {summary.manifest_uri})")
    print(f"images:        {out / 'generations'} ({len(PROMPTS)} prompts x {len(SUBJECTS)} subjects x {args.seeds} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
