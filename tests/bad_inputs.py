"""The bad-input corpus of issue 11: one list of cases, each a kind of input, how to make it, and what every entry
point that takes that kind must answer. ``test_bad_inputs.py`` runs each case through those entry points.

Kinds and the entry points that take them:

* ``cache``: a subject's cache file: ``dreamcache generate --cache`` (CLI), ``GET /v1/subjects/{id}`` and
  ``POST /v1/generate`` (Serve, the file placed in the open app's cache folder under the case's subject id).
* ``adapter``: an adapter file: ``dreamcache generate --adapter``.
* ``model``: a model folder: ``dreamcache generate --model``.
* ``checkpoint``: an official ``.pt``: ``dreamcache convert-official``.
* ``generate_body``: a raw JSON body of ``POST /v1/generate`` (Serve only).
* ``image``: a reference image's bytes: a catalog row of the caching job (``caching``: its error row).
* ``image_uri``: a catalog row's ``image_uri`` value: the caching job.
* ``subject_id``: a subject id: a catalog row of the caching job; ``--subjects`` of the generation job
  (``generation``: its error rows); the ``cache`` kind's files also go through the generation job, placed in its
  cache folder under the case's name.
* ``folder``: what a subject's folder under the caching job's ``--images`` prefix holds (``tests/test_caching``'s
  prefix run, which a second job would only slow down): a dict of relative keys to bytes, where
  :data:`FOLDER_MARKER` stands for the folder's own marker object (an S3 "directory" key ending in ``/``).
* ``serve_cli``: the options of ``dreamcache serve`` (``serve_cli``: its one line, before anything deploys).

A case's input is made by ``make(ctx)`` (``ctx``: a :class:`Materials` with the tiny model, a good cache and an
S3 prefix for the job cases) and is a path for the file kinds, a JSON text for ``generate_body``, a URI or an id
for ``image_uri`` / ``subject_id``, a dict for ``folder`` and an argument list for ``serve_cli``.

The job entry points run every case of their kinds in one job (one error row each, the job succeeds): a Ray Data
job costs tens of seconds here even when tiny, one per case would not fit the suite's time.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

Kind = str  # "cache" | "adapter" | "model" | "checkpoint" | "generate_body" | "image" | "image_uri" |
#             "subject_id" | "folder" | "serve_cli"
FOLDER_MARKER = "/"  # in a ``folder`` case: the subject folder's own marker object, ``<subject_id>/``
TEST_IMAGE_PIXELS = 200 * 200  # the max_image_pixels the job tests run with (the ``image-too-many-pixels`` case)


class Materials(NamedTuple):
    """What the cases are made from: a scratch folder, the tiny model, a valid cache of it (bytes), and an S3
    prefix (``s3://bucket/...``) the job cases may write under ("" where no S3 server runs)."""

    tmp: Path
    model_dir: Path
    good_cache: bytes
    s3_prefix: str = ""


@dataclass(frozen=True)
class Http:
    """An expected HTTP answer: the status and a text the body must contain (the field or file it names)."""

    status: int
    names: str


@dataclass(frozen=True)
class Case:
    name: str
    kind: Kind
    make: Callable[[Materials], str]
    cli: str | None = None  # the one error line must contain this (exit 2); None: no CLI entry point
    subject: Http | None = None  # GET /v1/subjects/{id}
    generate: Http | None = None  # POST /v1/generate
    caching: str | None = None  # the caching job's error row of the case's subject contains this
    generation: str | None = None  # the generation job's error rows of the case's subject contain this
    serve_cli: str | None = None  # `dreamcache serve` exits 2 with one line containing this, deploying nothing


# -- makers -------------------------------------------------------------------------------------------------------
def _write(ctx: Materials, name: str, data: bytes) -> str:
    path = ctx.tmp / name
    path.write_bytes(data)
    return str(path)


def _nan_cache(ctx: Materials) -> str:
    import torch
    from safetensors.torch import load, save

    from dreamcache.safetensors_header import read_metadata

    tensors = {k: torch.full_like(v, float("nan")) for k, v in load(ctx.good_cache).items()}
    return _write(ctx, "nan-cache.safetensors", save(tensors, metadata=read_metadata(ctx.good_cache)))


def _nan_adapter(ctx: Materials) -> str:
    import torch
    from safetensors.torch import load, save

    from dreamcache.safetensors_header import read_metadata

    data = (ctx.model_dir / "adapter.safetensors").read_bytes()
    tensors = {k: torch.full_like(v, float("inf")) for k, v in load(data).items()}
    return _write(ctx, "inf-adapter.safetensors", save(tensors, metadata=read_metadata(data)))


def _pickle_model(ctx: Materials) -> str:
    """The tiny model with its UNet weights as a pickle ``.bin`` instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    out = ctx.tmp / "pickle-model"
    if not out.exists():
        shutil.copytree(ctx.model_dir, out)
        weights = next((out / "unet").glob("*.safetensors"))
        torch.save(load_file(weights), out / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()
    return str(out)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))  # never run: weights_only refuses it


def _malicious_checkpoint(ctx: Materials) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save({"attn_mem.to_q.weight": _RunsCode()}, buffer)
    return _write(ctx, "malicious.pt", buffer.getvalue())


def _raw_pickle_checkpoint(ctx: Materials) -> str:
    return _write(ctx, "raw-pickle.pt", pickle.dumps({"a": _RunsCode()}))


def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    from PIL import Image

    image = Image.effect_noise(size, 50).convert("RGB") if noise else Image.new("RGB", size, "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image(name: str, data: Callable[[], bytes]) -> Callable[[Materials], str]:
    return lambda ctx: _write(ctx, name, data())


def put_folder_marker(uri: str) -> None:
    """An S3 "directory" object at ``uri`` (its key ending in ``/``, empty), which storage.write_bytes rightly
    refuses to make."""
    from dreamcache import storage

    location = storage.parse_uri(uri)
    storage.s3_client().put_object(Bucket=location.bucket, Key=location.path.rstrip("/") + "/", Body=b"")


def _folder_marker(ctx: Materials) -> str:
    put_folder_marker(f"{ctx.s3_prefix}/marker-as-image/")
    return f"{ctx.s3_prefix}/marker-as-image/"


_HELD: list = []  # listening sockets of the port-taken case, kept open for the session


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _busy_port() -> str:
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    _HELD.append(held)
    return str(held.getsockname()[1])


def _serve(*options: str) -> Callable[[Materials], list[str]]:
    """`dreamcache serve` options; ``{model}``, ``{tmp}`` and ``{busy_port}`` are filled in, and the good model,
    an empty cache folder and a free port stand for the options a case does not give."""
    def make(ctx: Materials) -> list[str]:
        given = [o.format(model=ctx.model_dir, tmp=ctx.tmp, busy_port=_busy_port() if "{busy_port}" in o else "")
                 for o in options]
        defaults = {"--model": str(ctx.model_dir), "--caches": str(ctx.tmp / "serve-caches"),
                    "--port": str(_free_port())}
        return ["serve", *(x for k, v in defaults.items() if k not in given for x in (k, v)), *given]
    return make


def _body(field: str, value: str) -> Callable[[Materials], str]:
    return lambda ctx: f'{{"subject_id": "nobody", "prompt": "a photo", "{field}": {value}}}'


CASES: list[Case] = [
    Case("cache-nan", "cache", _nan_cache, cli="hold NaN or inf", generate=Http(409, "NaN"),
         generation="hold NaN or inf"),
    Case("cache-truncated", "cache", lambda ctx: _write(ctx, "cut.safetensors", ctx.good_cache[:-64]),
         cli="not a readable cache file", subject=Http(409, "cache-truncated.safetensors"),
         generate=Http(409, "cache-truncated.safetensors"), generation="not a readable cache file"),
    Case("cache-empty", "cache", lambda ctx: _write(ctx, "empty.safetensors", b""),
         cli="not a readable cache file", subject=Http(409, "cache-empty.safetensors"),
         generate=Http(409, "cache-empty.safetensors"), generation="not a readable cache file"),
    Case("adapter-inf", "adapter", _nan_adapter, cli="hold NaN or inf"),
    Case("model-pickle-weights", "model", _pickle_model, cli="only .safetensors weights"),
    Case("checkpoint-code", "checkpoint", _malicious_checkpoint, cli="not a plain tensor checkpoint"),
    Case("checkpoint-raw-pickle", "checkpoint", _raw_pickle_checkpoint, cli="not a plain tensor checkpoint"),
    Case("guidance-nan", "generate_body", _body("guidance_scale", "NaN"), generate=Http(422, "guidance_scale")),
    Case("guidance-inf", "generate_body", _body("guidance_scale", "Infinity"), generate=Http(422, "guidance_scale")),
    Case("image-guidance-minus-inf", "generate_body", _body("image_guidance_scale", "-Infinity"),
         generate=Http(422, "image_guidance_scale")),
    # -- the Ray Data jobs: one error row per case, the job goes on ------------------------------------------------
    Case("image-undecodable", "image", _image("undecodable.png", lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(200))),
         caching="not an image"),
    Case("image-truncated", "image", _image("truncated.png", lambda: (lambda d: d[: len(d) // 2])(_png((64, 64), True))),
         caching="truncated"),
    Case("image-empty", "image", _image("empty.png", lambda: b""), caching="empty file"),
    Case("image-text", "image", _image("readme.txt", lambda: b"hello"), caching="not an image"),
    Case("image-ds-store", "image", _image(".DS_Store", lambda: b"\x00\x00\x00\x01Bud1" + bytes(40)),
         caching="not an image"),
    Case("image-too-many-pixels", "image", _image("big.png", lambda: _png((400, 400))), caching="exceeds the limit"),
    Case("image-too-small", "image", _image("tiny.png", lambda: _png((4, 4))), caching="too small"),
    Case("uri-http", "image_uri", lambda ctx: "http://example.com/a.png", caching="unsupported URI scheme 'http://'"),
    Case("uri-gs", "image_uri", lambda ctx: "gs://bucket/a.png", caching="unsupported URI scheme 'gs://'"),
    Case("uri-s3-no-bucket", "image_uri", lambda ctx: "s3:///a.png", caching="needs a bucket"),
    Case("uri-s3-bucket-only", "image_uri", lambda ctx: "s3://" + ctx.s3_prefix.split("/")[2],
         caching="not found"),
    Case("uri-missing-object", "image_uri", lambda ctx: f"{ctx.s3_prefix}/no-such/a.png", caching="not found"),
    Case("uri-missing-bucket", "image_uri", lambda ctx: "s3://no-such-bucket-dreamcache-corpus/a.png",
         caching="no-such-bucket-dreamcache-corpus"),
    Case("uri-remote-file-host", "image_uri", lambda ctx: "file://elsewhere/a.png", caching="remote host"),
    Case("uri-empty", "image_uri", lambda ctx: "", caching="no image_uri"),
    Case("uri-folder-marker", "image_uri", _folder_marker, caching="empty file"),
    Case("id-dotdot", "subject_id", lambda ctx: "../x", caching="subject id", generation="subject id"),
    Case("id-slash", "subject_id", lambda ctx: "a/b", caching="subject id", generation="subject id"),
    Case("id-space", "subject_id", lambda ctx: "bad id", caching="contains ' '", generation="contains ' '"),
    Case("id-control", "subject_id", lambda ctx: "bad\x01id", caching="subject id", generation="subject id"),
    Case("id-too-long", "subject_id", lambda ctx: "x" * 129, caching="subject id", generation="subject id"),
    Case("id-empty", "subject_id", lambda ctx: "", caching="subject id", generation="subject id"),
    Case("id-unknown", "subject_id", lambda ctx: "ghost", generation="no cache for subject 'ghost'"),
    Case("id-reserved", "subject_id", lambda ctx: "manifest.parquet", generation="reserved"),
    Case("folder-only-ds-store", "folder", lambda ctx: {".DS_Store": b"junk"}, caching="no images"),
    Case("folder-marker-only", "folder", lambda ctx: {FOLDER_MARKER: b""}, caching="no images"),
    Case("folder-hidden-image-only", "folder", lambda ctx: {".hidden.png": _png((64, 64))}, caching="no images"),
    Case("folder-empty-subfolder", "folder", lambda ctx: {"sub/": b""}, caching="no images"),
    # -- `dreamcache serve`: one line before anything deploys (the session's Ray: 4 CPUs, no GPU) -----------------
    Case("serve-model-missing", "serve_cli", _serve("--model", "/nonexistent"), serve_cli="/nonexistent is not a diffusers"),
    Case("serve-model-not-sd", "serve_cli", _serve("--model", "{tmp}"), serve_cli="no unet/config.json"),
    Case("serve-adapter-missing", "serve_cli", _serve("--adapter", "{tmp}/none.safetensors"),
         serve_cli="adapter file not found"),
    Case("serve-caches-http", "serve_cli", _serve("--caches", "http://example.com/caches"),
         serve_cli="unsupported URI scheme"),
    Case("serve-caches-a-file", "serve_cli", _serve("--caches", "{model}/model_index.json"), serve_cli="is a file"),
    Case("serve-port-taken", "serve_cli", _serve("--port", "{busy_port}"), serve_cli="already in use"),
    Case("serve-device-cuda", "serve_cli", _serve("--device", "cuda"), serve_cli="--device cuda"),
    Case("serve-gpus-over-cluster", "serve_cli", _serve("--gpus-per-replica", "1"), serve_cli="GPU 1 on one node"),
    Case("serve-cpus-over-node", "serve_cli", _serve("--cpus-per-replica", "64"), serve_cli="CPU 64 on one node"),
    Case("serve-replicas-over-cluster", "serve_cli", _serve("--replicas", "9", "--cpus-per-replica", "1"),
         serve_cli="9 of the generator replicas"),
    # A flag derived from ServeSettings keeps the model's check and its one-line error naming the field.
    Case("serve-batch-below-request-max", "serve_cli", _serve("--max-batch-size", "4"),
         serve_cli="'max_batch_size': Input should be greater than or equal to 8"),
]


def cases(*kinds: Kind, entry: str | None = None) -> list[Case]:
    """The cases of these kinds that have an expectation for ``entry`` (cli, subject, generate, caching,
    generation, serve_cli)."""
    return [c for c in CASES if c.kind in kinds and (entry is None or getattr(c, entry) is not None)]
