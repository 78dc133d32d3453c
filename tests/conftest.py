"""Shared pytest setup.

Environment defaults are set at import, before any test module imports ray / transformers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# tests/ is not a package; make its helper modules importable whatever the import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from s3_server import SeaweedS3  # noqa: E402
from serve_fixtures import Api, ServeApps, serve_test_apps  # noqa: E402

# Quiet, offline, local-only defaults; a caller's explicit setting wins.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the test process, Ray's workers and the Serve replicas all run torch on
# 2 cores at once, and oversubscribed threads made tiny-model steps several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Model/download caches go to a per-session temp dir (removed at exit), never ~/.cache.
if not os.environ.get("DREAMCACHE_CACHE_DIR"):
    os.environ["DREAMCACHE_CACHE_DIR"] = tempfile.mkdtemp(prefix="dreamcache-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DREAMCACHE_CACHE_DIR"], ignore_errors=True)

# AWS_* variables of the developer's own setup that would leak into requests to the test server.
_FOREIGN_AWS_VARS = ("AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) for the whole session, with the AWS_* variables pointing
    at it in os.environ; the previous values are restored afterwards."""
    from dreamcache.storage import clear_client_cache

    with SeaweedS3() as server:
        saved = {k: os.environ.get(k) for k in (*server.env(), *_FOREIGN_AWS_VARS)}
        for key in _FOREIGN_AWS_VARS:
            os.environ.pop(key, None)
        os.environ.update(server.env())
        clear_client_cache()
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            clear_client_cache()


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh, empty ``s3://<bucket>/test-<uuid>`` prefix on the session server."""
    return f"s3://{s3_server.bucket}/test-{uuid.uuid4().hex[:12]}"


# -- the tiny offline model, built once per session ------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from dreamcache.models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from dreamcache.pipeline import DreamCachePipeline

    pipe = DreamCachePipeline.from_pretrained(str(tiny_model_dir), adapter=str(tiny_model_dir / "adapter.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- a real local Ray, shared by every test that needs one ------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray for the session. Started after the S3 server so its workers inherit the AWS_* variables.
    Four logical CPUs on a 2-core machine: Ray Data's read tasks and the actor pools must not starve."""
    import ray

    from pipelines.kernel.ray_runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


# -- the Serve test apps, shared by the session (see serve_fixtures) ---------------------------------------------------
_SERVE_APPS = pytest.StashKey[ServeApps]()
_LAST_SERVE_USER = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def serve_apps(request, ray_cluster, s3_server, tiny_model_dir, tmp_path_factory) -> Iterator[ServeApps]:
    apps = ServeApps(serve_test_apps(tiny_model_dir, s3_server.bucket, tmp_path_factory.mktemp("serve")))
    request.config.stash[_SERVE_APPS] = apps  # for the early shutdown below
    try:
        yield apps
    finally:
        apps.close()


@pytest.fixture
def auth_api(serve_apps) -> Api:
    """The app with bearer-token auth and small limits, at /."""
    return serve_apps.api("auth")


@pytest.fixture
def open_api(serve_apps) -> Api:
    """The app without auth, at /open."""
    return serve_apps.api("open")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection and any reordering
def pytest_collection_modifyitems(items) -> None:
    """Mark the last test that uses the Serve apps: Serve is shut down right after it (below), so its replicas
    hold no CPUs while later tests run Ray jobs."""
    for item in reversed(items):
        if "serve_apps" in getattr(item, "fixturenames", ()):
            item.stash[_LAST_SERVE_USER] = True
            break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures first
    if item.stash.get(_LAST_SERVE_USER, False) and _SERVE_APPS in item.config.stash:
        item.config.stash[_SERVE_APPS].close()
