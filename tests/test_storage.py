"""dreamcache.storage against a real S3 server (SeaweedFS, see conftest.py) and local folders."""

from __future__ import annotations

import logging
import os
import stat
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamcache import storage
from dreamcache.storage import (
    InvalidId,
    Location,
    ObjectNotFound,
    PermissionDenied,
    StorageError,
    delete,
    download_prefix,
    ensure_local,
    exists,
    is_s3,
    join_uri,
    list_files,
    local_cache_dir_for,
    parse_uri,
    pyarrow_filesystem,
    read_bytes,
    s3_client,
    size,
    validate_id,
    write_bytes,
)


@pytest.fixture(params=["path", "file-uri", "s3"])
def base(request, tmp_path) -> str:
    """A fresh, empty base URI on each backend: a local path, a file:// URI, an S3 prefix."""
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file-uri":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_prefix")


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.txt", Location("s3", "bucket", "a/b.txt")),
        ("s3://bucket", Location("s3", "bucket", "")),
        ("s3://bucket/", Location("s3", "bucket", "")),
        ("S3://bucket//a/", Location("s3", "bucket", "a/")),
        ("file:///tmp/x/y", Location("file", None, "/tmp/x/y")),
        ("file://localhost/tmp/x", Location("file", None, "/tmp/x")),
        ("/tmp/a/../b", Location("file", None, "/tmp/b")),
    ],
)
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


def test_parse_uri_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_uri("data/x.bin") == Location("file", None, str(tmp_path / "data" / "x.bin"))


@pytest.mark.parametrize(
    "uri, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("http://host/x", "unsupported URI scheme 'http://'"),
        ("gs://bucket/x", "unsupported URI scheme 'gs://'"),
        ("s3://", "needs a bucket"),
        ("s3:///key", "needs a bucket"),
        ("file://otherhost/x", "remote host"),
    ],
)
def test_parse_uri_rejects(uri, match):
    with pytest.raises(ValueError, match=match):
        parse_uri(uri)


@pytest.mark.parametrize(
    "base_uri, parts, expected",
    [
        ("s3://b", ("x",), "s3://b/x"),
        ("s3://b/", ("x", "y.bin"), "s3://b/x/y.bin"),
        ("s3://b/p/", ("/x/", "//y"), "s3://b/p/x/y"),
        ("s3://b/p", ("a/b", "c"), "s3://b/p/a/b/c"),
        ("s3://b/p", (), "s3://b/p"),
        ("/data/root", ("a", "b.txt"), "/data/root/a/b.txt"),
        ("/data/root/", ("/a/",), "/data/root/a"),
        ("/", ("a",), "/a"),
        ("rel/dir", ("x",), "rel/dir/x"),
        ("file:///data/root/", ("a", "b"), "file:///data/root/a/b"),
        ("file:///", ("a",), "file:///a"),
    ],
)
def test_join_uri(base_uri, parts, expected):
    assert join_uri(base_uri, *parts) == expected


def test_join_uri_rejects_bad_base():
    with pytest.raises(ValueError):
        join_uri("http://x/y", "z")


def test_is_s3():
    assert is_s3("s3://b/k") and is_s3("S3://b")
    assert not is_s3("/tmp/x") and not is_s3("file:///x") and not is_s3("")


# --------------------------------------------------------------------------- round trips


def test_round_trip(base):
    uri = join_uri(base, "sub", "dir", "blob.bin")
    assert not exists(uri)
    write_bytes(uri, b"hello")
    assert exists(uri)
    assert read_bytes(uri) == b"hello"
    assert size(uri) == 5
    write_bytes(uri, bytearray(b"replaced!"))  # overwrite
    assert read_bytes(uri) == b"replaced!" and size(uri) == 9
    write_bytes(join_uri(base, "empty"), b"")
    assert read_bytes(join_uri(base, "empty")) == b"" and size(join_uri(base, "empty")) == 0
    delete(uri)
    assert not exists(uri)
    delete(uri)  # idempotent


def test_list_files_recursive_sorted(base):
    names = ["b.txt", "a/z.bin", "a/b/c.bin", "a.txt", "a/a.bin"]
    for name in names:
        write_bytes(join_uri(base, name), name.encode())
    assert list_files(base) == sorted(join_uri(base, n) for n in names)
    assert list_files(join_uri(base, "a")) == [
        join_uri(base, n) for n in ["a/a.bin", "a/b/c.bin", "a/z.bin"]
    ]
    # The prefix is a directory: "a" does not match "a.txt" or a sibling "ab/".
    write_bytes(join_uri(base, "ab", "x"), b"x")
    assert join_uri(base, "ab", "x") not in list_files(join_uri(base, "a"))
    assert list_files(join_uri(base, "missing")) == []


def test_list_files_skips_s3_directory_markers(s3_server, s3_prefix):
    write_bytes(join_uri(s3_prefix, "dir", "f.bin"), b"1")
    loc = parse_uri(s3_prefix)
    for marker in ("dir/", "empty/", ""):  # "" -> the prefix's own marker "test-xxx/"
        s3_client().put_object(Bucket=loc.bucket, Key=f"{loc.path}/{marker}", Body=b"")
    assert list_files(s3_prefix) == [join_uri(s3_prefix, "dir", "f.bin")]


def test_list_files_local_skips_empty_dirs_and_temp_files(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / ".f.bin.0123456789ab.dreamcache-tmp").write_bytes(b"partial")
    write_bytes(str(tmp_path / "f.bin"), b"1")
    assert list_files(str(tmp_path)) == [str(tmp_path / "f.bin")]


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"  # parents are created
    write_bytes(str(target), b"x" * 1000)
    write_bytes(str(target), b"y" * 10)
    assert target.read_bytes() == b"y" * 10
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not tempfile's 0o600


def test_local_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="disk on fire"):
        write_bytes(str(target), b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_if_absent_creates_once(base):
    uri = join_uri(base, "commits", "00001.json")
    storage.write_bytes_if_absent(uri, b"first")
    with pytest.raises(storage.AlreadyExists, match="already exists"):
        storage.write_bytes_if_absent(uri, b"second")
    assert read_bytes(uri) == b"first"
    assert list_files(join_uri(base, "commits")) == [uri]  # and locally no temp file left by either write
    if not storage.is_s3(base):
        assert os.listdir(os.path.dirname(storage.parse_uri(uri).path)) == ["00001.json"]


# --------------------------------------------------------------------------- errors


def test_missing_object_raises_object_not_found(base):
    missing = join_uri(base, "nope", "missing.bin")
    with pytest.raises(ObjectNotFound, match="missing.bin"):
        read_bytes(missing)
    with pytest.raises(ObjectNotFound):
        size(missing)
    assert exists(missing) is False


def test_local_permission_denied(tmp_path, monkeypatch):
    f = tmp_path / "secret.bin"
    f.write_bytes(b"x")
    f.chmod(0)
    if os.geteuid() == 0:  # root ignores file modes: make open() refuse instead

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(f))

        monkeypatch.setattr(storage, "open", refuse, raising=False)
    with pytest.raises(PermissionDenied, match="secret.bin"):
        read_bytes(str(f))


def test_missing_bucket_fails_fast_naming_the_bucket(s3_server):
    uri = "s3://no-such-bucket-dc/a/b.bin"
    start = time.monotonic()
    for op in (read_bytes, exists, size, list_files, lambda u: write_bytes(u, b"x")):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-dc' does not exist") as info:
            op(uri)
        assert not isinstance(info.value, ObjectNotFound)
    assert time.monotonic() - start < 5


def test_wrong_secret_raises_permission_denied_quickly(s3_server, s3_prefix, monkeypatch):
    uri = join_uri(s3_prefix, "x.bin")
    write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key)  # a fresh client sees it
    start = time.monotonic()
    for op in (read_bytes, exists, list_files, lambda u: write_bytes(u, b"y")):
        with pytest.raises(PermissionDenied, match="AWS_SECRET_ACCESS_KEY"):
            op(uri)
    assert time.monotonic() - start < 5
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key-id")
    with pytest.raises(PermissionDenied, match="InvalidAccessKeyId"):
        read_bytes(uri)


def test_unreachable_endpoint_retries_then_fails(s3_server, monkeypatch, caplog):
    from s3_server import free_port_pairs

    closed = free_port_pairs(1)[0]  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed}")  # wins over AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    with pytest.raises(StorageError, match="gave up after retries") as info:
        read_bytes(f"s3://{s3_server.bucket}/x")
    assert f"127.0.0.1:{closed}" in str(info.value)
    assert len([r for r in caplog.records if "Retry needed" in r.getMessage()]) == 2  # botocore's own retries


def test_s3_client_follows_the_boto3_configuration(s3_server, monkeypatch):
    retries = s3_client().meta.config.retries
    assert retries == {"mode": "standard", "total_max_attempts": 5}  # the project's defaults
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert s3_client().meta.config.retries == {"mode": "adaptive", "total_max_attempts": 2}
    assert s3_client().meta.endpoint_url == s3_server.endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert s3_client().meta.endpoint_url == "http://127.0.0.1:1"
    assert s3_client().meta.config.s3 == {"addressing_style": "path"}  # a custom endpoint is addressed by path
    fs, _ = pyarrow_filesystem("s3://b/k")
    options = fs.__reduce__()[1][0]  # what the filesystem was made with (its pickled arguments)
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:1", "http")  # where boto3 points
    assert options["access_key"] == s3_server.access_key


def test_a_bad_endpoint_is_named(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")  # no scheme
    with pytest.raises(ValueError, match="127.0.0.1:9000.*AWS_ENDPOINT_URL_S3"):
        read_bytes(f"s3://{s3_server.bucket}/x")


def test_s3_client_is_cached_per_settings(s3_server, monkeypatch):
    assert s3_client() is s3_client()
    first = s3_client()
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert s3_client() is not first
    assert s3_client().meta.region_name == "eu-west-1"


# --------------------------------------------------------------------------- download / cache


def test_download_prefix_mirrors_and_skips_unchanged(s3_prefix, tmp_path):
    files = {
        "model_index.json": b"{}",
        "unet/config.json": b'{"a": 1}',
        "unet/w.bin": os.urandom(3000),
    }
    for name, data in files.items():
        write_bytes(join_uri(s3_prefix, name), data)
    dest = tmp_path / "mirror"
    assert download_prefix(s3_prefix, dest) == dest.resolve()
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    inodes = {name: (dest / name).stat().st_ino for name in files}

    write_bytes(join_uri(s3_prefix, "unet/config.json"), b'{"a": 12}')  # size changes
    download_prefix(s3_prefix, dest)
    assert (dest / "unet/config.json").read_bytes() == b'{"a": 12}'
    assert (dest / "unet/config.json").stat().st_ino != inodes["unet/config.json"]
    for name in ("model_index.json", "unet/w.bin"):  # unchanged: not rewritten
        assert (dest / name).stat().st_ino == inodes[name]
    assert not [p for p in dest.rglob("*") if p.name.endswith(".dreamcache-tmp")]


def test_copies_report_their_bytes_as_they_go(s3_prefix, tmp_path):
    """The progress callback behind download_prefix's bar counts every byte, from S3 and from a local folder."""
    data = os.urandom(3 * 2**20 + 7)  # more than one local chunk
    (tmp_path / "src.bin").write_bytes(data)
    write_bytes(join_uri(s3_prefix, "big.bin"), data)
    for src in (join_uri(s3_prefix, "big.bin"), str(tmp_path / "src.bin")):
        seen: list[int] = []
        dest = tmp_path / f"copy-{len(src)}.bin"
        storage._fetch_one(src, dest, progress=seen.append)
        assert dest.read_bytes() == data and sum(seen) == len(data) and len(seen) > 1, src


def test_download_prefix_empty_prefix_is_an_error(s3_prefix, tmp_path):
    with pytest.raises(ObjectNotFound, match="no files under"):
        download_prefix(join_uri(s3_prefix, "nothing-here"), tmp_path)


def test_download_prefix_from_local(tmp_path):
    write_bytes(str(tmp_path / "src" / "a" / "b.bin"), b"data")
    out = download_prefix(str(tmp_path / "src"), tmp_path / "dst")
    assert (out / "a" / "b.bin").read_bytes() == b"data"


def test_ensure_local(s3_prefix, tmp_path):
    write_bytes(join_uri(s3_prefix, "m", "w.bin"), b"weights")
    local = ensure_local(join_uri(s3_prefix, "m"))
    assert local == local_cache_dir_for(join_uri(s3_prefix, "m"))
    assert (local / "w.bin").read_bytes() == b"weights"
    assert ensure_local(str(tmp_path)) == tmp_path
    with pytest.raises(ObjectNotFound):
        ensure_local(str(tmp_path / "missing"))


def test_local_cache_dir_for(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMCACHE_CACHE_DIR", str(tmp_path))
    a = local_cache_dir_for("s3://bucket/models/sd-1.5")
    assert a == local_cache_dir_for("s3://bucket/models/sd-1.5/")
    assert a.parent.parent == tmp_path and a.name.startswith("bucket_models_sd-1.5-")
    assert a != local_cache_dir_for("s3://bucket/models/sd-1_5")
    assert a != local_cache_dir_for("s3://other/models/sd-1.5")
    odd = local_cache_dir_for("s3://b/we ird/..\\päth?x=1")
    assert odd.parent.parent == tmp_path and all(c.isascii() and c not in " \\?=" for c in odd.name)
    monkeypatch.delenv("DREAMCACHE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert local_cache_dir_for("s3://b/m").is_relative_to(tmp_path / "xdg" / "dreamcache")


def test_conftest_keeps_the_cache_out_of_home():
    assert os.environ["DREAMCACHE_CACHE_DIR"]
    assert not local_cache_dir_for("s3://b/m").is_relative_to(os.path.expanduser("~/.cache"))


# --------------------------------------------------------------------------- pyarrow


def test_pyarrow_filesystem_parquet_round_trip(base):
    fs, path = pyarrow_filesystem(join_uri(base, "table"))
    fs.create_dir(path, recursive=True)  # needed locally; on S3 it writes a marker object
    table = pa.table({"subject_id": ["a", "b", "c"], "score": [0.5, 1.5, 2.5]})
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/part-0.parquet", filesystem=fs).equals(table)
    assert pq.read_table(path, filesystem=fs).equals(table)  # as a dataset folder
    # The same object is visible through the object API (pyarrow's dir markers are skipped).
    assert list_files(join_uri(base, "table")) == [join_uri(base, "table", "part-0.parquet")]


def test_make_bucket(s3_server):
    name = s3_server.make_bucket("dc-extra-bucket")
    assert s3_server.make_bucket(name) == name  # idempotent
    write_bytes(f"s3://{name}/k", b"v")
    assert read_bytes(f"s3://{name}/k") == b"v"


def test_pyarrow_filesystem_kinds(s3_server):
    import pyarrow.fs as pafs

    fs, path = pyarrow_filesystem("s3://bucket/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    assert fs.region == "us-east-1"
    fs, path = pyarrow_filesystem("file:///tmp/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x"


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("good", ["a", "Z9", "subject-001", "dog_2.v3", "0" * 128, "a.b-c_d"])
def test_validate_id_accepts(good):
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("", "must not be empty"),
        ("..", "start with a letter or digit"),
        ("a/b", "contains '/'"),
        ("a\\b", "contains '\\\\\\\\'"),
        (".hidden", "start with a letter or digit"),
        ("a..b", "must not contain '..'"),
        ("x" * 129, "129 characters long"),
        ("a\nb", "contains '\\\\n'"),
        ("a b", "contains ' '"),
        ("é", "start with a letter or digit"),
        ("aé", "contains 'é'"),
        ("-a", "start with a letter or digit"),
        ("a\x00", "contains"),
    ],
)
def test_validate_id_rejects(bad, problem):
    with pytest.raises(InvalidId, match=problem) as info:
        validate_id(bad, "subject id")
    assert "subject id" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_id_message_is_truncated_and_names_what():
    with pytest.raises(InvalidId, match="job id") as info:
        validate_id("x" * 500, what="job id")
    assert len(str(info.value)) < 150


def test_versions_change_when_content_is_rewritten(base):
    uri = storage.join_uri(base, "v", "a.bin")
    storage.write_bytes(uri, b"one")
    first = storage.stat(uri)
    listed = storage.list_objects(storage.join_uri(base, "v"))
    assert [(o.uri, o.size, o.version) for o in listed] == [(uri, 3, first.version)]
    time.sleep(0.01)
    storage.write_bytes(uri, b"two")  # same size, new content
    assert storage.stat(uri).version != first.version
    with pytest.raises(storage.ObjectNotFound):
        storage.stat(storage.join_uri(base, "v", "missing.bin"))


def test_read_range(base):
    uri = storage.join_uri(base, "r.bin")
    storage.write_bytes(uri, bytes(range(100)))
    assert storage.read_range(uri, 10, 5) == bytes(range(10, 15))
    assert storage.read_range(uri, 95, 50) == bytes(range(95, 100))


def test_download_prefix_refetches_a_same_size_rewrite(s3_prefix, tmp_path):
    storage.write_bytes(storage.join_uri(s3_prefix, "w.bin"), b"AAAA")
    storage.download_prefix(s3_prefix, tmp_path / "m")
    storage.write_bytes(storage.join_uri(s3_prefix, "w.bin"), b"BBBB")  # new weights, same size
    storage.download_prefix(s3_prefix, tmp_path / "m")
    assert (tmp_path / "m" / "w.bin").read_bytes() == b"BBBB"
