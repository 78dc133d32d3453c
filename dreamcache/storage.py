"""All storage access in DreamCache goes through this module.

Every path the library and the Ray jobs handle is a *URI*: a local path, a ``file://`` URI
or ``s3://bucket/prefix``.  This module is the single place that turns such a URI into I/O,
so that

* the rest of the code never branches on the scheme: ``read_bytes(uri)`` works the same for
  a local file in a unit test and for an object on AWS, MinIO or SeaweedFS in production;
* endpoint and credentials are taken from one set of variables only, the standard AWS ones
  (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``),
  read at call time, for boto3 (objects) and ``pyarrow.fs`` (datasets) alike;
* errors are translated once: transient failures (throttling, HTTP 5xx, dropped or timed-out
  connections) are retried with exponential backoff and jitter, while permanent ones fail
  fast as :class:`ObjectNotFound`, :class:`PermissionDenied` or :class:`StorageError` with a
  message that names the URI, instead of a raw botocore traceback after minutes of retries;
* writes are whole: a reader never sees half an object (S3 ``put_object`` is atomic; local
  writes go to a temporary file in the same folder that is then ``os.replace``-d);
* ids that end up in paths and keys are validated (:func:`validate_id`), so user input can
  never escape its prefix.

Retries happen at two levels.  botocore's ``standard`` retry mode (``AWS_MAX_ATTEMPTS``
attempts, default 3) retries each HTTP request on throttling, 5xx and connection errors.
Around each whole operation, including the read of a response body, which botocore does not
retry, :func:`_with_retries` makes up to ``DREAMCACHE_S3_MAX_ATTEMPTS`` attempts (default 5)
with a base delay of ``DREAMCACHE_S3_RETRY_BASE_DELAY`` seconds (default 0.5), doubling up to
``DREAMCACHE_S3_RETRY_MAX_DELAY`` (default 20).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from tqdm import tqdm

from .errors import InvalidValue

if TYPE_CHECKING:  # pyarrow is heavy; imported lazily (pyarrow_filesystem, read_parquet, write_parquet)
    import pyarrow
    import pyarrow.fs

__all__ = [
    "StorageError",
    "ObjectNotFound",
    "PermissionDenied",
    "InvalidId",
    "Location",
    "parse_uri",
    "join_uri",
    "is_s3",
    "read_bytes",
    "write_bytes",
    "read_parquet",
    "write_parquet",
    "exists",
    "delete",
    "size",
    "list_files",
    "list_objects",
    "upload_dir",
    "ObjectInfo",
    "stat",
    "read_range",
    "download_prefix",
    "ensure_local",
    "local_cache_dir_for",
    "s3_client",
    "clear_client_cache",
    "pyarrow_filesystem",
    "validate_id",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Suffix of the temporary files written by local atomic writes; list_files() skips them.
_TMP_SUFFIX = ".dreamcache-tmp"
_CONNECT_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 60.0
_CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials) and that AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL points at the right server"
)


# --------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed; the message names the URI and the cause."""


class ObjectNotFound(StorageError):
    """The object or file does not exist."""


class PermissionDenied(StorageError):
    """The credentials were refused or lack permission for the object."""


class BucketNotFound(StorageError):
    """The S3 bucket does not exist (not an ObjectNotFound: a missing bucket is a setup error for most callers)."""


class InvalidId(InvalidValue):
    """An id (subject id, job id, ...) is not safe to use as a path component or S3 key."""

    kind = "unsafe_id"


class InvalidURI(InvalidValue):
    """Not a URI this module can use: an empty string, an unsupported scheme (``http://``), ``s3://`` without a
    bucket, a ``file://`` URI with a remote host, a prefix where an object is needed."""


# --------------------------------------------------------------------------- URIs

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclass(frozen=True)
class Location:
    """A parsed URI.

    ``scheme`` is ``"file"`` or ``"s3"``; ``bucket`` is set for S3 only; ``path`` is an
    absolute local path, or an S3 key without a leading slash (``""`` for a bucket's root).
    """

    scheme: str
    bucket: str | None
    path: str

    @property
    def uri(self) -> str:
        """The canonical URI of this location (``s3://bucket/key`` or an absolute path)."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path


def parse_uri(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/key`` URI.

    Raises InvalidURI for an empty URI, an unsupported scheme (``http://``, ``gs://``...),
    an S3 URI without a bucket, or a ``file://`` URI naming a remote host.
    """
    if not isinstance(uri, (str, os.PathLike)):
        raise InvalidURI(f"expected a URI string, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri or not uri.strip():
        raise InvalidURI("empty URI")
    m = _SCHEME_RE.match(uri)
    if m is None:  # a plain local path
        return Location("file", None, os.path.abspath(os.path.expanduser(uri)))
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidURI(f"S3 URI needs a bucket: {uri!r} (expected s3://bucket/key)")
        return Location("s3", bucket, key.lstrip("/"))
    if scheme == "file":
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise InvalidURI(f"file:// URI with a remote host is not supported: {uri!r}")
        if not sep:
            raise InvalidURI(f"file:// URI needs an absolute path: {uri!r}")
        return Location("file", None, os.path.abspath("/" + path))
    raise InvalidURI(
        f"unsupported URI scheme {scheme + '://'!r} in {uri!r}: use a local path, file:// or s3://"
    )


def _segments(*parts: str) -> list[str]:
    """Split path parts on '/' and drop empty segments (so joins never double a slash)."""
    return [seg for part in parts for seg in part.split("/") if seg]


def join_uri(base: str, *parts: str) -> str:
    """Join relative parts onto a URI, keeping the base's form (path, file:// or s3://).

    Leading, trailing and repeated slashes in the parts are dropped:
    ``join_uri("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"``.
    """
    loc = parse_uri(base)
    rel = "/".join(_segments(*parts))
    if loc.scheme == "s3":
        key = "/".join(_segments(loc.path, rel))
        return f"s3://{loc.bucket}/{key}" if key else f"s3://{loc.bucket}"
    if not rel:
        return base
    if _SCHEME_RE.match(base):  # file:// keeps its form
        return "file://" + loc.path.rstrip("/") + "/" + rel
    return base.rstrip("/") + "/" + rel  # "/" -> "" -> "/rel"


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


# --------------------------------------------------------------------------- ids

_ID_MAX_LEN = 128
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")


def validate_id(value: str, what: str = "subject id") -> str:
    """Return ``value`` if it is safe as a single path component and S3 key part.

    Accepted: 1..128 ASCII characters, the first alphanumeric, the rest alphanumerics or
    ``. _ -``, and no ``..`` anywhere.  Anything else (slashes, backslashes, spaces, control
    or non-ASCII characters, a leading dot) raises :class:`InvalidId`.
    """
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a string, got {type(value).__name__}: {shown}")
    if not value:
        raise InvalidId(f"{what} must not be empty")
    if len(value) > _ID_MAX_LEN:
        raise InvalidId(f"{what} is {len(value)} characters long (max {_ID_MAX_LEN}): {shown}")
    if not (value[0].isascii() and value[0].isalnum()):
        raise InvalidId(f"{what} must start with a letter or digit: {shown}")
    if ".." in value:
        raise InvalidId(f"{what} must not contain '..': {shown}")
    if not _ID_RE.fullmatch(value):
        bad = next(c for c in value if not (c.isascii() and (c.isalnum() or c in "._-")))
        raise InvalidId(
            f"{what} contains {bad!r}; only letters, digits and '._-' are allowed: {shown}"
        )
    return value


# --------------------------------------------------------------------------- retries


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return max(minimum, int(raw)) if raw else default
    except ValueError:
        raise InvalidValue(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        raise InvalidValue(f"{name} must be a number, got {raw!r}") from None


_THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestLimitExceeded", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable",
})
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    bexc.EndpointConnectionError,
    bexc.ConnectionClosedError,
    bexc.ReadTimeoutError,
    bexc.ConnectTimeoutError,
    bexc.ResponseStreamingError,  # connection dropped while reading a body
    bexc.IncompleteReadError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
    "AllAccessDisabled", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AccountProblem", "InvalidSecurity",
})


def _error_code(exc: bexc.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    return str(error.get("Code", "")), int(status)


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can help: throttling, HTTP 5xx, or a connection-level error."""
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc)
        return code in _THROTTLING_CODES or status == 429 or status >= 500
    return isinstance(exc, _TRANSIENT_EXCEPTIONS)


def _with_retries(
    fn: Callable[[], T],
    what: str,
    *,
    attempts: int | None = None,
    base_delay: float | None = None,
) -> T:
    """Call ``fn()``; retry transient errors with exponential backoff and jitter.

    Permanent errors (and the last transient one) are re-raised unchanged; translating them
    is the caller's job.  ``attempts`` and ``base_delay`` default to
    ``DREAMCACHE_S3_MAX_ATTEMPTS`` (5) and ``DREAMCACHE_S3_RETRY_BASE_DELAY`` (0.5 s).
    """
    if attempts is None:
        attempts = _env_int("DREAMCACHE_S3_MAX_ATTEMPTS", 5)
    if base_delay is None:
        base_delay = _env_float("DREAMCACHE_S3_RETRY_BASE_DELAY", 0.5)
    max_delay = _env_float("DREAMCACHE_S3_RETRY_MAX_DELAY", 20.0)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not _is_transient(exc):
                raise
            cap = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = cap / 2 + random.uniform(0, cap / 2)  # "equal jitter"
            log.warning(
                "%s failed (attempt %d/%d, retrying in %.2fs): %s: %s",
                what, attempt, attempts, delay, type(exc).__name__, exc,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- S3 clients


@dataclass(frozen=True)
class _S3Settings:
    """The AWS_* variables that shape a client; hashable, so it keys the client cache."""

    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)
    botocore_attempts: int

    @classmethod
    def from_env(cls) -> "_S3Settings":
        env = os.environ
        endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip()
        if endpoint and not endpoint.lower().startswith(("http://", "https://")):
            raise InvalidValue(
                f"AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL must start with http:// or https://, "
                f"got {endpoint!r}"
            )
        return cls(
            endpoint=endpoint.rstrip("/") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            botocore_attempts=_env_int("AWS_MAX_ATTEMPTS", 3),
        )


def s3_client() -> Any:
    """A boto3 S3 client built from the AWS_* environment variables (read at call time).

    Clients are cached per process and settings: boto3 clients are thread-safe, and the pid
    in the key gives a forked Ray worker its own client (connection pools do not survive a
    fork).  Path-style addressing is used whenever a custom endpoint is set.
    """
    return _cached_client(_S3Settings.from_env(), os.getpid())


@functools.lru_cache(maxsize=16)
def _cached_client(settings: _S3Settings, pid: int) -> Any:
    custom = settings.endpoint is not None
    config = Config(
        region_name=settings.region,
        signature_version="s3v4",
        s3={"addressing_style": "path"} if custom else {},
        retries={"mode": "standard", "max_attempts": settings.botocore_attempts},
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_READ_TIMEOUT_S,
        max_pool_connections=32,
        # S3-compatible servers do not all implement the CRC checksums boto3 sends by default.
        request_checksum_calculation="when_required" if custom else "when_supported",
        response_checksum_validation="when_required" if custom else "when_supported",
    )
    session = boto3.session.Session()  # a private session: boto3's default one is not thread-safe
    return session.client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=config,
    )


# Buckets confirmed to exist, per (endpoint, bucket): lets a 404 on HEAD be told apart
# (missing key vs. missing bucket) without an extra request each time.
_known_buckets: set[tuple[str | None, str]] = set()


def clear_client_cache() -> None:
    """Forget cached clients (e.g. after changing AWS_* variables in a test)."""
    _cached_client.cache_clear()
    _known_buckets.clear()


def _check_bucket(client: Any, loc: Location, uri: str) -> None:
    """Raise StorageError if the bucket does not exist (called after an ambiguous 404)."""
    key = (_S3Settings.from_env().endpoint, loc.bucket)
    if key in _known_buckets:
        return
    try:
        _with_retries(lambda: client.head_bucket(Bucket=loc.bucket), f"HEAD bucket {loc.bucket}")
    except bexc.ClientError as exc:
        code, status = _error_code(exc)
        if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
            raise BucketNotFound(f"bucket '{loc.bucket}' does not exist ({uri})") from None
        raise _translate(exc, uri, f"HEAD bucket {loc.bucket}") from exc
    _known_buckets.add(key)


def _translate(exc: Exception, uri: str, what: str) -> StorageError:
    """Map a botocore exception to a StorageError subclass with a clear message."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            bucket = parse_uri(uri).bucket
            return BucketNotFound(f"bucket '{bucket}' does not exist ({uri})")
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"object not found: {uri}")
        if code in _DENIED_CODES or status == 403:
            return PermissionDenied(
                f"{what}: access denied for {uri} ({code}); {_CREDENTIALS_HINT}"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        suffix = " (gave up after retries)" if _is_transient(exc) else ""
        return StorageError(f"{what} failed for {uri}: {code or status} {message}{suffix}".rstrip())
    if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
        return PermissionDenied(f"{what}: no usable credentials for {uri}; {_CREDENTIALS_HINT}")
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return StorageError(f"{what} failed for {uri} (gave up after retries): {exc}")
    return StorageError(f"{what} failed for {uri}: {type(exc).__name__}: {exc}")


def _s3_call(loc: Location, uri: str, what: str, fn: Callable[[Any], T]) -> T:
    """Run ``fn(client)`` with retries and translate its errors."""
    client = s3_client()
    try:
        return _with_retries(lambda: fn(client), f"{what} {uri}")
    except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
        raise _translate(exc, uri, what) from exc


def _head(loc: Location, uri: str) -> dict[str, Any] | None:
    """HEAD an object; None if it does not exist (a missing bucket raises StorageError)."""
    client = s3_client()
    try:
        return _s3_call(loc, uri, "HEAD", lambda c: c.head_object(Bucket=loc.bucket, Key=loc.path))
    except ObjectNotFound:
        _check_bucket(client, loc, uri)
        return None


# --------------------------------------------------------------------------- local helpers


def _local_error(exc: OSError, uri: str, what: str) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"file not found: {uri}")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{what}: permission denied for {uri}: {exc}")
    return StorageError(f"{what} failed for {uri}: {exc}")


def _atomic_local_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` via a temp file in the same folder and ``os.replace`` (no torn files)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    # os.open with 0o666 lets the umask apply, unlike tempfile's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _local_version(st: os.stat_result) -> str:
    # Local files have no ETag; size and modification time change whenever the content is rewritten.
    return f"{st.st_size}-{st.st_mtime_ns}"


def _walk_local(root: str) -> Iterator[tuple[str, int, str]]:
    """Yield (relative posix path, size, version) of the files under ``root``, skipping temp files."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.endswith(_TMP_SUFFIX):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # removed while walking
                continue
            yield os.path.relpath(full, root).replace(os.sep, "/"), st.st_size, _local_version(st)


def _list_entries(uri: str) -> list[tuple[str, int, str]]:
    """(relative path, size, version) of every file under the prefix ``uri``, sorted by path."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            return sorted(_walk_local(loc.path))
        except OSError as exc:
            raise _local_error(exc, uri, "list") from exc
    prefix = loc.path.strip("/")
    prefix = prefix + "/" if prefix else ""

    def list_all(client: Any) -> list[tuple[str, int, str]]:
        entries = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):  # "directory marker" objects
                    continue
                entries.append((key[len(prefix):], int(obj["Size"]), obj.get("ETag", "").strip('"')))
        return entries

    return sorted(_s3_call(loc, uri, "LIST", list_all))


# --------------------------------------------------------------------------- public I/O


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise _local_error(exc, uri, "read") from exc
    return _s3_call(
        loc, uri, "GET",
        lambda c: c.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read(),
    )


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file or object atomically (parents are created locally)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes needs bytes, got {type(data).__name__}")
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            _atomic_local_write(loc.path, lambda fh: fh.write(data))
        except OSError as exc:
            raise _local_error(exc, uri, "write") from exc
        return
    if not loc.path or loc.path.endswith("/"):
        raise InvalidURI(f"cannot write an object to a prefix: {uri!r}")
    body = bytes(data)
    _s3_call(loc, uri, "PUT", lambda c: c.put_object(Bucket=loc.bucket, Key=loc.path, Body=body))


class AlreadyExists(StorageError):
    """A create-if-absent write found the object already there (another writer won)."""


def write_bytes_if_absent(uri: str, data: bytes) -> None:
    """Create a file or object only if nothing is there yet (commit objects: two runs racing for the same
    version number must not both win). Locally a hard link of a finished temp file (atomic, fails if the name
    exists); on S3 a conditional PUT (``If-None-Match: *``), then a read-back, for servers that ignore the
    condition. Raises :class:`AlreadyExists` when the name is taken."""
    loc = parse_uri(uri)
    body = bytes(data)
    if loc.scheme == "file":
        parent = os.path.dirname(loc.path)
        tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
        try:
            _atomic_local_write(tmp, lambda fh: fh.write(body))
            try:
                os.link(tmp, loc.path)
            except FileExistsError:
                raise AlreadyExists(f"already exists: {uri}") from None
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise _local_error(exc, uri, "write") from exc
        return
    try:
        _s3_call(loc, uri, "PUT", lambda c: c.put_object(Bucket=loc.bucket, Key=loc.path, Body=body, IfNoneMatch="*"))
    except StorageError as exc:
        cause = exc.__cause__
        if isinstance(cause, bexc.ClientError) and _error_code(cause)[1] in (409, 412):
            raise AlreadyExists(f"already exists: {uri}") from None
        raise
    if read_bytes(uri) != body:  # a server that ignored If-None-Match let a concurrent writer overwrite
        raise AlreadyExists(f"already exists (written concurrently by another run): {uri}")


def read_parquet(uri: str) -> pyarrow.Table:
    """A whole Parquet file or object (manifests, plans, catalogs): one GET, parsed in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(uri)))


def write_parquet(uri: str, table: pyarrow.Table, **options: Any) -> None:
    """Write ``table`` as one whole Parquet object (atomic put or rename: readers see the old or the new file);
    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. row_group_size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, **options)
    write_bytes(uri, buffer.getvalue().to_pybytes())


def exists(uri: str) -> bool:
    """Whether a file (not a directory) or object exists at ``uri``.

    A missing bucket raises StorageError rather than answering False, so a typo in a bucket
    name does not pass for an empty one.
    """
    loc = parse_uri(uri)
    if loc.scheme == "file":
        return os.path.isfile(loc.path)
    if not loc.path:
        return False
    return _head(loc, uri) is not None


def size(uri: str) -> int:
    """The size in bytes of a file or object."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            return os.stat(loc.path).st_size
        except OSError as exc:
            raise _local_error(exc, uri, "stat") from exc
    head = _head(loc, uri) if loc.path else None
    if head is None:
        raise ObjectNotFound(f"object not found: {uri}")
    return int(head["ContentLength"])


def delete(uri: str) -> None:
    """Delete a file or object; deleting something that does not exist is not an error."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            os.remove(loc.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _local_error(exc, uri, "delete") from exc
        return
    if not loc.path:
        raise ValueError(f"refusing to delete a bucket: {uri!r}")
    _s3_call(loc, uri, "DELETE", lambda c: c.delete_object(Bucket=loc.bucket, Key=loc.path))


def list_files(prefix_uri: str) -> list[str]:
    """Full URIs of all files under a prefix, recursively, sorted.

    The prefix is a directory: ``s3://b/p`` lists the keys under ``p/`` (not ``p2/...``).
    Directory-marker keys ending in '/' and in-progress local temp files are skipped; a
    missing prefix lists as empty.  URIs keep the form of ``prefix_uri``.
    """
    return [join_uri(prefix_uri, rel) for rel, _, _ in _list_entries(prefix_uri)]


@dataclass(frozen=True)
class ObjectInfo:
    """A file or object: its URI, size, and a version that changes whenever its content is rewritten
    (the S3 ETag; size and mtime locally). Lets jobs skip unchanged inputs without reading them."""

    uri: str
    size: int
    version: str


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """Like :func:`list_files`, with each file's size and version (one LIST, no per-object request)."""
    return [ObjectInfo(join_uri(prefix_uri, rel), n, v) for rel, n, v in _list_entries(prefix_uri)]


@dataclass(frozen=True)
class ListedObject:
    """One entry of :func:`list_page`: its name relative to the prefix, size and last-modified time (epoch s)."""

    name: str
    size: int
    modified: float


def list_page(prefix_uri: str, after: str | None, limit: int, suffix: str = "") -> tuple[list[ListedObject], bool]:
    """Up to ``limit`` objects directly under a prefix (not in its "folders") whose names end with ``suffix``, in
    name order, starting after the name ``after``; and whether more follow. For paged listings of huge prefixes:
    S3 is asked from ``after`` on (StartAfter) and stops at the page, so nothing of the prefix's size is held."""
    loc = parse_uri(prefix_uri)
    found: list[ListedObject] = []
    if loc.scheme == "file":
        try:
            with os.scandir(loc.path) as entries:
                # The page's names only (limit + 1 tells whether more follow), not a sorted list of the folder.
                names = heapq.nsmallest(limit + 1, (
                    e.name for e in entries if e.name.endswith(suffix) and not e.name.endswith(_TMP_SUFFIX)
                    and (after is None or e.name > after) and e.is_file(follow_symlinks=False)))
        except FileNotFoundError:
            return [], False
        except OSError as exc:
            raise _local_error(exc, prefix_uri, "list") from exc
        for name in names:
            if len(found) == limit:
                return found, True
            try:
                st = os.stat(os.path.join(loc.path, name))
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append(ListedObject(name, st.st_size, st.st_mtime))
        return found, False
    prefix = loc.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": prefix, "Delimiter": "/",
                              "MaxKeys": min(1000, max(limit + 1, 1))}
    if after is not None:
        kwargs["StartAfter"] = prefix + after

    def one_page(client: Any, token: str | None) -> dict[str, Any]:
        return client.list_objects_v2(**kwargs, **({"ContinuationToken": token} if token else {}))

    token: str | None = None
    while True:
        page = _s3_call(loc, prefix_uri, "LIST", lambda c: one_page(c, token))
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix):]
            if not name or not name.endswith(suffix):
                continue
            if len(found) == limit:
                return found, True
            found.append(ListedObject(name, int(obj["Size"]), obj["LastModified"].timestamp()))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return found, False


def stat(uri: str) -> ObjectInfo:
    """Size and version of one file or object; ObjectNotFound if it does not exist."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            st = os.stat(loc.path)
        except OSError as exc:
            raise _local_error(exc, uri, "stat") from exc
        if not os.path.isfile(loc.path):
            raise ObjectNotFound(f"not a file: {uri}")
        return ObjectInfo(uri, st.st_size, _local_version(st))
    head = _head(loc, uri) if loc.path else None
    if head is None:
        raise ObjectNotFound(f"object not found: {uri}")
    return ObjectInfo(uri, int(head["ContentLength"]), head.get("ETag", "").strip('"'))


def read_range(uri: str, start: int, length: int) -> bytes:
    """Up to ``length`` bytes from offset ``start`` (a file header without reading the whole object)."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except OSError as exc:
            raise _local_error(exc, uri, "read") from exc
    byte_range = f"bytes={start}-{start + length - 1}"
    return _s3_call(
        loc, uri, "GET",
        lambda c: c.get_object(Bucket=loc.bucket, Key=loc.path, Range=byte_range)["Body"].read(),
    )


# --------------------------------------------------------------------------- sharded listing
# A catalog of millions of objects is listed by many tasks at once: S3 by key ranges (ListObjectsV2 from
# StartAfter to an upper bound), a local folder by hashing its top-level entries over the shards.

def listing_shards(prefix_uri: str, shards: int) -> list[tuple[str | None, str | None]]:
    """Key ranges ``(after, upto]`` relative to the prefix that together cover every key exactly once."""
    # Boundaries at single characters; a range may cut a subject's keys ("id/...") in two, which the grouping
    # stage after the listing makes harmless.
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    if shards <= 1:
        return [(None, None)]
    step = max(1, len(alphabet) // (shards - 1))
    bounds = list(alphabet[::step])[: shards - 1]
    return list(zip([None] + bounds, bounds + [None]))


def iter_listing_shard(prefix_uri: str, shard: tuple[str | None, str | None], index: int, count: int,
                       recursive: bool = True) -> Iterator[tuple[str, int, str]]:
    """(relative path, size, version) of the files of one shard, in pages (nothing accumulates).

    S3: the keys in the shard's range ``(after, upto]`` (``recursive=False``: only the prefix's own objects,
    not those inside "folders"). Local: the top-level entries whose name hashes to ``index`` of ``count``,
    walked (or, not recursive, the files among them). Directory entries with nothing inside are reported as
    ``(name + "/", 0, "")`` so a caller can tell an empty subject folder from no folder at all."""
    loc = parse_uri(prefix_uri)
    if loc.scheme == "file":
        yield from _iter_local_shard(loc.path, index, count, recursive, prefix_uri)
        return
    prefix = loc.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    after, upto = shard
    kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    if after is not None:
        kwargs["StartAfter"] = prefix + after
    client = s3_client()
    paginator = client.get_paginator("list_objects_v2")
    try:
        pages = iter(paginator.paginate(**kwargs))
        while True:
            page = _with_retries(lambda: next(pages, None), f"LIST {prefix_uri}")
            if page is None:
                return
            keys = [(obj["Key"], int(obj["Size"]), obj.get("ETag", "").strip('"')) for obj in page.get("Contents", [])]
            for key, nbytes, version in sorted(keys):
                rel = key[len(prefix):]
                if upto is not None and rel > upto:
                    return
                if rel:
                    yield rel, nbytes, version
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        raise _translate(exc, prefix_uri, "LIST") from exc


def _iter_local_shard(root: str, index: int, count: int, recursive: bool, uri: str) -> Iterator[tuple[str, int, str]]:
    try:
        entries = os.scandir(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _local_error(exc, uri, "list") from exc
    with entries:
        for entry in entries:
            name = entry.name
            if count > 1 and int(hashlib.blake2b(name.encode(errors="surrogateescape"), digest_size=4).hexdigest(), 16) % count != index:
                continue
            if name.endswith(_TMP_SUFFIX):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if not is_dir:
                    st = entry.stat()
                    yield name, st.st_size, _local_version(st)
                    continue
            except FileNotFoundError:
                continue
            if not recursive:
                continue
            found = False
            for rel, nbytes, version in _walk_local(entry.path):
                found = True
                yield f"{name}/{rel}", nbytes, version
            if not found:
                yield name + "/", 0, ""


def _fetch_one(src_uri: str, dest: Path, progress: Callable[[int], Any] | None = None) -> None:
    """Copy one file or object to ``dest`` atomically, streaming (no whole-file buffering); ``progress`` is
    called with each chunk's size in bytes."""
    loc = parse_uri(src_uri)
    if loc.scheme == "file":
        def copy(fh) -> None:
            while chunk := src.read(1 << 20):
                fh.write(chunk)
                if progress:
                    progress(len(chunk))

        try:
            with open(loc.path, "rb") as src:
                _atomic_local_write(str(dest), copy)
        except OSError as exc:
            raise _local_error(exc, src_uri, "copy") from exc
        return
    # download_fileobj does parallel ranged GETs; each retry starts a fresh temp file (and counts its bytes again).
    _s3_call(
        loc, src_uri, "download",
        lambda c: _atomic_local_write(
            str(dest), lambda fh: c.download_fileobj(loc.bucket, loc.path, fh, Callback=progress)
        ),
    )


def upload_dir(local_dir: str | os.PathLike[str], prefix_uri: str) -> list[str]:
    """Copy every file under a local folder to ``prefix_uri`` (e.g. a model folder into S3); returns the URIs."""
    root = Path(local_dir)
    uris = []
    for rel, _, _ in sorted(_walk_local(str(root))):
        uri = join_uri(prefix_uri, *rel.split("/"))
        write_bytes(uri, (root / rel).read_bytes())
        uris.append(uri)
    return uris


_VERSIONS_FILE = ".dreamcache-versions.json"  # what download_prefix fetched, by relative path -> version


def download_prefix(prefix_uri: str, local_dir: str | os.PathLike[str]) -> Path:
    """Mirror every file under ``prefix_uri`` into ``local_dir`` and return it.

    Files already there with the same version (ETag) as last fetched are skipped, so a second
    call is cheap and a re-uploaded file of the same size (new weights, same architecture) is
    fetched again; each file is written atomically, so concurrent callers (several Ray workers
    on one node) are safe.  Local files absent from the prefix are left alone.  An empty or missing prefix
    raises ObjectNotFound (it is almost always a wrong URI).
    """
    root = Path(local_dir).expanduser().resolve()
    entries = _list_entries(prefix_uri)
    if not entries:
        raise ObjectNotFound(f"no files under {prefix_uri}")
    versions_file = root / _VERSIONS_FILE
    try:
        known = json.loads(versions_file.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    todo = []
    for rel, nbytes, version in entries:
        dest = root.joinpath(*rel.split("/"))
        if not dest.resolve().is_relative_to(root):  # a key like "../x" must not escape
            raise StorageError(f"refusing to write outside {root}: {rel!r} in {prefix_uri}")
        try:
            if dest.stat().st_size == nbytes and known.get(rel) == version:
                continue
        except FileNotFoundError:
            pass
        todo.append((rel, nbytes, version, dest))
    fetched = 0
    # Model folders are gigabytes: a byte-level bar on a terminal (none in logs: disable=None is "not a TTY").
    with tqdm(total=sum(t[1] for t in todo), unit="B", unit_scale=True, unit_divisor=1024, disable=None,
              desc=f"mirroring {prefix_uri}", leave=False) as bar:
        for rel, _, version, dest in todo:
            _fetch_one(join_uri(prefix_uri, rel), dest, progress=bar.update)
            known[rel] = version
            fetched += 1
    if fetched:
        _atomic_local_write(str(versions_file), lambda fh: fh.write(json.dumps(known, sort_keys=True).encode()))
    log.info("download_prefix %s -> %s: %d fetched, %d up to date",
             prefix_uri, root, fetched, len(entries) - fetched)
    return root


def local_cache_dir_for(uri: str) -> Path:
    """A stable local folder for a copy of ``uri`` (not created here).

    It lies under ``$DREAMCACHE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dreamcache`` or
    ``~/.cache/dreamcache``) and is named from a sanitized, readable form of the URI plus a
    hash of it, so different URIs never share a folder and ``s3://b/p`` == ``s3://b/p/``.
    """
    loc = parse_uri(uri)
    base = os.environ.get("DREAMCACHE_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        base = os.path.join(xdg, "dreamcache")
    canonical = Location(loc.scheme, loc.bucket, loc.path.rstrip("/") or loc.path).uri
    readable = "/".join(_segments(loc.bucket or "", loc.path))
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[-80:].lstrip("._-")
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    name = f"{readable}-{digest}" if readable else digest
    return Path(base).expanduser().resolve() / loc.scheme / name


def ensure_local(uri: str) -> Path:
    """A local folder holding the prefix ``uri``: the folder itself for a local URI, else a
    copy downloaded once into :func:`local_cache_dir_for` (e.g. model weights on S3)."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            raise ObjectNotFound(f"directory not found: {uri}")
        return Path(loc.path)
    return download_prefix(uri, local_cache_dir_for(uri))


# --------------------------------------------------------------------------- datasets


def pyarrow_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """A ``pyarrow.fs`` filesystem and the path inside it for ``uri``.

    S3 gets an ``S3FileSystem`` configured from the same AWS_* variables as
    :func:`s3_client` and the path ``bucket/key``; local paths get ``LocalFileSystem`` and
    the absolute path.
    """
    import pyarrow.fs as pafs

    loc = parse_uri(uri)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    s = _S3Settings.from_env()
    kwargs: dict[str, Any] = {
        "region": s.region,
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "request_timeout": _READ_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=_env_int("DREAMCACHE_S3_MAX_ATTEMPTS", 5)
        ),
    }
    if s.access_key and s.secret_key:
        kwargs.update(access_key=s.access_key, secret_key=s.secret_key,
                      session_token=s.session_token)
    if s.endpoint:
        parts = urlsplit(s.endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme.lower())
    path = f"{loc.bucket}/{loc.path}".rstrip("/")
    return pafs.S3FileSystem(**kwargs), path
