"""Helpers for the Serve tests: a real Serve app on 127.0.0.1 (free port) on the session's local Ray, and
reference images. Each test module starts its own app and shuts Serve down when it ends, so no Serve actor
holds CPUs while other modules run Ray Data jobs."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_png(seed: int, size: int = 64) -> bytes:
    """A random RGB image as PNG bytes: distinct seeds give distinct subjects (distinct caches)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_app_args(model_dir: Path, caches: str, **overrides: Any) -> dict[str, Any]:
    """App args for the tiny model on a 2-core machine: small CPU shares, one torch thread per replica
    (two threads on two busy cores run ~10x slower than one here)."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "adapter": str(model_dir / "adapter.safetensors"),
        "caches": caches,
        "cpus_per_replica": 0.25,
        "ingress_cpus": 0.1,
        "torch_threads": 1,
        "gpus_per_replica": 0,
    }
    args.update(overrides)
    return args


@contextlib.contextmanager
def running_app(app_args: dict[str, Any], name: str) -> Iterator[str]:
    """Serve on a free loopback port with one app at /; yields its base URL; Serve is shut down afterwards."""
    from ray import serve

    from pipelines.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(app_args), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
