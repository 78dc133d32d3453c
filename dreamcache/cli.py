"""The ``dreamcache`` command line of the method: tiny-model, cache, generate, convert-official.

The installed ``dreamcache`` script is ``pipelines.cli:main``, which adds the Ray commands (serve, ...) to
these; ``python -m dreamcache.cli`` runs the method's commands alone, without Ray.

Bad input (a missing file, a corrupt image, a cache from another model, an unsafe id) ends with exit code 2
and one line on stderr; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# torch, diffusers and the S3 client are imported by the commands that use them, not here: building the parser
# (and so `dreamcache --help`) must not pay seconds of imports.
from . import options, runtime
from .cache_info import library_version  # torch-free
from .cli_args import ArgumentParser, add_config_arguments, config_from_namespace, option
from .errors import DreamCacheError
from .images import PreprocessMode
from .runtime import quiet_libraries

logger = logging.getLogger("dreamcache")


class UsageError(DreamCacheError):
    """A bad command line value found after parsing."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2, one line), not a bug: the DreamCacheError family (argument
    checks raise its InvalidValue, a ValueError too), storage failures, and a missing local file or folder. A
    bare ValueError is a bug and keeps its traceback. Importing them loads boto3."""
    from . import storage

    return DreamCacheError, storage.StorageError, FileNotFoundError, NotADirectoryError, IsADirectoryError


def model_spec(args: argparse.Namespace, adapter: str | None = None) -> runtime.ModelSpec:
    """The --model/--device/--dtype options as runtime's model spec, for its one loader (runtime.load_pipeline)."""
    # adapter=False: the method's commands name their adapter file explicitly (generate) or need none (cache).
    return config_from_namespace(runtime.ModelSpec, args, adapter=adapter or False)


@dataclass
class CacheOptions:
    """`dreamcache cache`'s options besides the model (ModelSpec's) and the images."""

    out: str = option(help="folder or s3:// prefix for <subject_id>.safetensors")
    subject_id: str | None = option(None, "treat all images as references of one subject with this id")
    resolution: int | None = options.resolution_field()
    preprocess: PreprocessMode = options.preprocess_field()
    cache_prompt: str = options.cache_prompt_field()
    seed: int = option(0, "noise seed (per image, mixed with the image hash)")
    batch_size: int = option(8, "images per UNet call")


@dataclass
class GenerateOptions:
    """`dreamcache generate`'s options besides the model (ModelSpec's) and the prompts."""

    adapter: str = option(help="adapter safetensors file (path or s3:// URI)")
    cache: str = option(help="the subject's cache file (path or s3:// URI)")
    negative_prompt: str | None = option(None)
    num_images: int = option(1, "images per prompt")
    steps: int = options.steps_field()
    guidance_scale: float = options.guidance_scale_field()
    image_guidance_scale: float = options.image_guidance_scale_field()
    guidance: options.Guidance = options.guidance_field()
    eta: float = option(0.0, "DDIM eta: 0 (deterministic) as the official DreamBench script; its sample_ref.sh uses 1")
    height: int | None = options.side_field("height")
    width: int | None = options.side_field("width")
    seed: int = option(0)
    out: str = option("dreamcache-out", "output folder for PNGs")


# -- commands -------------------------------------------------------------------------------------------------
def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .models import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed)
    print(f"tiny model written to {out} (adapter: {out / 'adapter.safetensors'})")


def cmd_cache(args: argparse.Namespace) -> None:
    from . import storage
    from .images import decode_image, sha256_hex

    images, hashes, names = [], [], []
    for uri in args.images:
        data = storage.read_bytes(uri)
        images.append(decode_image(data, source=uri))
        hashes.append(sha256_hex(data))
        names.append(PurePosixPath(storage.parse_uri(uri).path).stem)
    if args.subject_id:
        subjects = {storage.validate_id(args.subject_id): list(range(len(images)))}
    else:  # one subject per image, named after the file
        subjects = {}
        for i, name in enumerate(names):
            subject = storage.validate_id(name, "subject id (from the file name; pass --subject-id)")
            if subject in subjects:
                raise UsageError(f"two images are both named {subject!r}; pass --subject-id for a multi-reference subject")
            subjects[subject] = [i]
    pipe = runtime.load_pipeline(model_spec(args))
    caches = pipe.build_caches(images, hashes, resolution=args.resolution, preprocess=args.preprocess,
                               cache_prompt=args.cache_prompt, seed=args.seed, batch_size=args.batch_size)
    from .cache import FeatureCache
    from .cache_store import CacheStore

    for subject, indices in subjects.items():
        cache = FeatureCache.concat([caches[i] for i in indices], subject_id=subject)
        uri, _ = CacheStore(args.out).write(subject, cache)
        print(f"{subject}: {cache.num_references} reference(s), {cache.nbytes() / 2**20:.2f} MiB -> {uri}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from . import storage
    from .image_files import image_name, png_bytes

    pipe = runtime.load_pipeline(model_spec(args, adapter=args.adapter))
    cache = pipe.load_cache(args.cache)
    subject = cache.info.subject_id or PurePosixPath(storage.parse_uri(args.cache).path).stem
    generator = torch.Generator().manual_seed(args.seed)
    result = pipe(
        args.prompt, cache, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale, guidance=args.guidance,
        num_images_per_prompt=args.num_images, generator=generator, height=args.height, width=args.width,
        eta=args.eta,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        prompt_index, sample = divmod(i, args.num_images)
        # Named from everything that decides the pixels (as the batch job names its images), so a run with
        # another prompt or setting never overwrites an earlier image.
        parameters = generate_parameters(args, subject, args.prompt[prompt_index], sample, cache.info.fingerprint())
        _, name = image_name(parameters)
        path = out / f"{subject}-{name}"
        path.write_bytes(png_bytes(image, parameters, pipe.base_model, cache.info.fingerprint()))
        print(path)


def generate_parameters(args: argparse.Namespace, subject: str, prompt: str, sample: int, cache_fingerprint: str) -> dict:
    """What decides one image of ``dreamcache generate``: its name's hash and its PNG's text chunks."""
    return {"subject_id": subject, "cache_fingerprint": cache_fingerprint, "prompt": prompt,
            "negative_prompt": args.negative_prompt, "seed": args.seed, "sample": sample, "steps": args.steps,
            "guidance_scale": args.guidance_scale, "image_guidance_scale": args.image_guidance_scale,
            "guidance": args.guidance, "eta": args.eta, "height": args.height, "width": args.width,
            "num_images": args.num_images, "model": args.model, "adapter": args.adapter, "dtype": args.dtype}


def cmd_convert_official(args: argparse.Namespace) -> None:
    from . import storage
    from .convert import convert_official_checkpoint

    data = storage.read_bytes(args.checkpoint)
    storage.write_bytes(args.out, convert_official_checkpoint(data, backbone=args.backbone))
    print(f"converted 45 tensors -> {args.out}")


def cmd_toy_world_build(args: argparse.Namespace) -> None:
    from .toy_model import BuildSettings, build, results_table

    settings = BuildSettings.quick(args.seed) if args.quick else BuildSettings(seed=args.seed)
    result = build(args.out, seed=args.seed, settings=settings, export=args.export)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(f"toy world built in {args.out}: model {result.model_dir}, adapter {result.adapter} ({times})")
    if result.evaluation:
        print(results_table(result.evaluation))


def cmd_toy_world_evaluate(args: argparse.Namespace) -> None:
    from . import toy_model

    # Unset flags take the toy model's own defaults (kept out of the parser: building it must not import torch).
    given = {"steps": args.steps, "guidance_scale": args.guidance_scale,
             "image_guidance_scale": args.image_guidance_scale}
    model = Path(args.model) if args.model else toy_model.MODEL_DIR
    rows = toy_model.evaluate(model, args.adapter or model / toy_model.ADAPTER_FILE,
                              seeds=args.seeds, sheet=args.sheet, **{k: v for k, v in given.items() if v is not None})
    print(toy_model.results_table(rows))


def cmd_toy_world_references(args: argparse.Namespace) -> None:
    from .toy_world import SUBJECT_IDS, references

    for path in references(args.subjects or SUBJECT_IDS, args.out):
        print(path)


def _add_toy_world_commands(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy-world", help="the procedural toy world: build its model and adapters, evaluate")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")
    p = toy_sub.add_parser("build", help="render the world, train VAE, base model and adapters, evaluate (CPU)")
    p.add_argument("out", help="output folder (data, model/, adapter run, loss curves, evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the recipe, not a usable model")
    p.add_argument("--export", help="copy the trained model/ (with adapter.safetensors) into this folder")
    p.set_defaults(func=cmd_toy_world_build)
    p = toy_sub.add_parser("evaluate", help="identity and context accuracy: trained vs no cache vs untrained")
    p.add_argument("--model", help="toy model folder (default: the committed one, dreamcache/assets/toy_world/model)")
    p.add_argument("--adapter", help="adapter file (default: the committed one, <model>/adapter.safetensors)")
    p.add_argument("--seeds", type=int, default=1, help="images per subject and prompt")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the toy model's, 15)")
    p.add_argument("--guidance-scale", type=float, help="text scale (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, help="image scale of compositional guidance (default 0.4)")
    p.add_argument("--sheet", help="write a contact sheet PNG here")
    p.set_defaults(func=cmd_toy_world_evaluate)
    p = toy_sub.add_parser("references", help="write the subjects' references as <out>/<subject_id>/ref.png")
    p.add_argument("out")
    p.add_argument("--subjects", nargs="+", help="subject ids (default: all nine)")
    p.set_defaults(func=cmd_toy_world_references)


# -- parser ---------------------------------------------------------------------------------------------------
def build_parser(extend: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The method's commands; ``extend`` adds more (the Ray commands of ``pipelines.cli``) without this
    library importing Ray."""
    parser = ArgumentParser(prog="dreamcache", description="DreamCache: personalized generation from cached features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"dreamcache {library_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-model", help="write a tiny random-weight SD model with matching random adapters")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("cache", help="compute feature caches of reference images")
    add_config_arguments(p, runtime.ModelSpec)  # --model, --device, --dtype
    p.add_argument("images", nargs="+", metavar="IMAGE", help="reference images (paths or s3:// URIs)")
    add_config_arguments(p, CacheOptions)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("generate", help="generate images of a cached subject")
    add_config_arguments(p, runtime.ModelSpec)
    p.add_argument("--prompt", required=True, action="append", help="prompt; repeat for several")
    add_config_arguments(p, GenerateOptions)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert-official", help="convert the authors' cross_attention-*.pt to an adapter file")
    p.add_argument("checkpoint", help="the official .pt (path or s3:// URI); read with weights_only=True")
    p.add_argument("out", help="output .safetensors (path or s3:// URI)")
    p.add_argument("--backbone", choices=["sd21", "sd15"], default="sd21")
    p.set_defaults(func=cmd_convert_official)
    _add_toy_world_commands(sub)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extend: Callable[[argparse._SubParsersAction], None] | None = None) -> int:
    parser = build_parser(extend)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        args.func(args)
    except (UsageError, *user_errors()) as exc:  # evaluated only when an exception gets here
        print(f"dreamcache: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
