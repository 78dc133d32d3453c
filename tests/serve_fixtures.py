"""Helpers for the Serve tests: the test apps, one Serve instance shared by every test module that uses them,
and reference images.

Starting Serve and deploying an app (a replica loading the model) costs most of a Serve test module's time on
this 2-core machine, so the apps are shared by the session (the ``serve_apps`` fixture in conftest.py): Serve
starts, on a free loopback port, with all the apps, when the first test needs one.
conftest.py shuts Serve down right after the last test that uses it, so no Serve replica holds CPUs while later
tests run Ray Data or Ray Train jobs; a use after that starts it again.

Three apps, because auth and routing are app-wide:

* ``auth`` at ``/``: bearer-token auth on, one generator replica with an LRU of :data:`AUTH_LRU_SLOTS`
  subjects, small upload limits and a small queue, so that every contract of the API can be reached.
* ``open`` at ``/open``: no auth, default limits, :data:`OPEN_REPLICAS` generator replicas (routing by subject
  across replicas; the web page without a token, and under a route prefix).
* ``other`` at ``/other``: as ``open``, but routed by the other ``routing`` setting than the default, so
  that the routing and batching tests run under both (:data:`OTHER_ROUTING`), with the auth app's batch wait
  so that concurrent requests share batches.
"""

from __future__ import annotations

import io
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
from PIL import Image

from pipelines.serve.settings import ROUTINGS, ServeSettings

AUTH_LRU_SLOTS = 2
AUTH_MAX_UPLOAD = 100_000
OPEN_REPLICAS = 2  # at 0.25 CPU each: both fit the session's 4-CPU Ray next to the auth app
# ServeSettings.routing's default, and the other value: the two apps that route run under both.
DEFAULT_ROUTING = ServeSettings.model_fields["routing"].default
OTHER_ROUTING = next(r for r in ROUTINGS if r != DEFAULT_ROUTING)


class _AppToken:
    """The default of :meth:`Api.client`: the app's own token (None where auth is off)."""


APP_TOKEN: Final = _AppToken()


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


@dataclass(frozen=True)
class AppSpec:
    """One test app: its Serve name, route prefix and application args, and what its tests need to know."""

    name: str
    route_prefix: str
    args: dict[str, Any]
    caches: str
    uploads: str = ""  # a prefix the app accepts JSON image URIs under, for the tests that send some
    token: str | None = None


@dataclass(frozen=True)
class Api:
    """A deployed test app as its tests see it."""

    url: str  # base URL, route prefix included, no trailing slash
    name: str  # the Serve application name (for deployment handles)
    caches: str
    uploads: str
    token: str | None = field(default=None, repr=False)

    def client(self, token: str | None | _AppToken = APP_TOKEN) -> httpx.Client:
        """An HTTP client on the app; with the app's token unless another (or None: no header) is given."""
        token = self.token if isinstance(token, _AppToken) else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=180)


def serve_test_apps(model_dir: Path, s3_bucket: str, workdir: Path) -> dict[str, AppSpec]:
    """The session's apps (see the module docstring); caches and uploads under fresh prefixes."""
    root = f"s3://{s3_bucket}/serve-{uuid.uuid4().hex[:8]}"
    token = "test-token-" + uuid.uuid4().hex
    token_file = workdir / "token"
    token_file.write_text(token + "\n")
    auth = tiny_app_args(
        model_dir, f"{root}/caches",
        api_token_file=str(token_file),
        max_caches_per_replica=AUTH_LRU_SLOTS,
        batch_wait_timeout_s=0.2,  # long enough that concurrent test requests share batches
        max_ongoing_requests=8,
        # Serve counts a request as queued until it is assigned, so a burst larger than this is refused at
        # once: 16 lets the 8-request bursts of the tests through, and the overload test sends 40.
        max_queued_requests=16,
        max_upload_bytes=AUTH_MAX_UPLOAD,
        max_references=3,
        allowed_image_prefixes=[f"{root}/uploads/"],
        request_timeout_s=120,
    )
    open_caches = str(workdir / "open-caches")  # a local folder: the store's path backend, next to S3 above
    open_ = tiny_app_args(model_dir, open_caches, replicas=OPEN_REPLICAS, batch_wait_timeout_s=0.01)
    other_caches = str(workdir / "other-caches")
    other = tiny_app_args(model_dir, other_caches, replicas=OPEN_REPLICAS, batch_wait_timeout_s=0.2,
                             routing=OTHER_ROUTING)
    return {
        "auth": AppSpec("dreamcache-test", "/", auth, f"{root}/caches", f"{root}/uploads", token),
        "open": AppSpec("dreamcache-open", "/open", open_, open_caches),
        "other": AppSpec("dreamcache-other", "/other", other, other_caches),
    }


class ServeApps:
    """Serve on a free loopback port with the given apps; :meth:`close` shuts it down, and a later :meth:`api`
    starts it again.

    All apps are deployed together on first use (``serve.run_many``): their replicas then start side by side,
    which is quicker than one app after the other, and every Serve test module uses both apps anyway."""

    def __init__(self, specs: dict[str, AppSpec]) -> None:
        self._specs = specs
        self._port: int | None = None

    def api(self, key: str) -> Api:
        if self._port is None:
            self._start()
        spec = self._specs[key]
        url = f"http://127.0.0.1:{self._port}{spec.route_prefix.rstrip('/')}"
        return Api(url, spec.name, spec.caches, spec.uploads, spec.token)

    def _start(self) -> None:
        from ray import serve

        from pipelines.serve import build_app

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run_many([serve.RunTarget(build_app(spec.args), name=spec.name, route_prefix=spec.route_prefix)
                            for spec in self._specs.values()])
        except BaseException:
            serve.shutdown()
            raise
        self._port = port

    def close(self) -> None:
        if self._port is None:
            return
        from ray import serve

        self._port = None
        serve.shutdown()
