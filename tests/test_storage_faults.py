"""dreamcache.storage's retries, through a fault-injecting proxy (flaky_proxy.py) in front of the real S3 server."""

from __future__ import annotations

import logging
import os

import pytest
from flaky_proxy import FlakyProxy

from dreamcache import storage


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """The session's S3 server behind a FlakyProxy, with storage pointed at the proxy."""
    with FlakyProxy(s3_server.endpoint) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", flaky.endpoint)  # wins over AWS_ENDPOINT_URL
        yield flaky


@pytest.fixture
def stored(s3_prefix) -> tuple[str, bytes]:
    """An object written directly (list it before `proxy` among a test's fixtures), and its bytes."""
    uri, data = storage.join_uri(s3_prefix, "blob.bin"), os.urandom(256 * 1024 + 3)
    storage.write_bytes(uri, data)
    return uri, data


def test_a_503_is_retried_by_botocore(stored, proxy):
    uri, data = stored
    proxy.fail_next(2)
    assert storage.read_bytes(uri) == data
    assert proxy.count("GET") == 3  # two 503s, then the real answer
    proxy.fail_next(1, method="PUT")
    storage.write_bytes(uri, b"after a 503")
    assert proxy.count("PUT") == 2 and storage.read_bytes(uri) == b"after a 503"


def test_a_body_cut_off_midway_is_read_again(stored, proxy, caplog):
    uri, data = stored
    caplog.set_level(logging.WARNING, logger="dreamcache.storage")
    proxy.cut_next(1, after=len(data) // 2)
    assert storage.read_bytes(uri) == data
    assert proxy.count("GET") == 2
    assert [r.getMessage() for r in caplog.records if "body cut off" in r.getMessage()][0].startswith(f"GET {uri}")
    proxy.cut_next(1, after=10)
    assert storage.read_range(uri, 1000, 100) == data[1000:1100]
    assert proxy.count("GET") == 4


def test_a_body_cut_off_every_time_gives_a_storage_error(stored, proxy, monkeypatch):
    uri, _ = stored
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    proxy.cut_next(100, after=1000)
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(uri)
    assert type(info.value) is storage.StorageError
    assert str(info.value).startswith(f"GET failed for {uri} (gave up after retries): ")
    assert proxy.count("GET") == 3


def test_503s_outlasting_the_retries_give_a_storage_error(stored, proxy, monkeypatch):
    uri, _ = stored
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.fail_next(100)
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(uri)
    assert type(info.value) is storage.StorageError
    assert str(info.value) == (
        f"GET failed for {uri}: SlowDown Please reduce your request rate. (gave up after 2 attempts)")
    assert proxy.count("GET") == 2
