"""All storage access in DreamCache goes through this module.

Every path the library and the Ray jobs handle is a *URI*: a local path, a ``file://`` URI
or ``s3://bucket/prefix``.  This module is the single place that turns such a URI into I/O,
so that

* the rest of the code never branches on the scheme: ``read_bytes(uri)`` works the same for
  a local file in a unit test and for an object on AWS, MinIO or SeaweedFS in production.
  Inside, :func:`_store` picks the one class per scheme (:class:`_LocalStore`,
  :class:`_S3Store`) that implements every operation;
* endpoint, region, credentials and retry settings come from boto3's own configuration chain
  (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_MAX_ATTEMPTS``,
  ``AWS_RETRY_MODE``, ``~/.aws/config``, ...), read when a client is made; ``pyarrow.fs``
  (datasets) is given what boto3 resolved, so both always talk to the same server;
* errors are translated once: permanent failures fail fast as :class:`ObjectNotFound`,
  :class:`PermissionDenied` or :class:`StorageError` with a message that names the URI, and
  transient ones that outlasted the retries say so, instead of a raw botocore traceback;
* writes are whole: a reader never sees half an object (S3 ``put_object`` is atomic; local
  writes go to a temporary file in the same folder that is then ``os.replace``-d);
* ids that end up in paths and keys are validated (:func:`validate_id`), so user input can
  never escape its prefix.

Retries are botocore's: ``standard`` mode, 5 attempts in all, unless ``AWS_RETRY_MODE`` /
``AWS_MAX_ATTEMPTS`` (or the config file) say otherwise.  The one gap is a GET whose body is
cut off after the headers arrived, which botocore does not retry: :meth:`_S3Store._get`
repeats those GETs with tenacity, as many attempts.  (Downloads go through s3transfer, which
retries cut-off parts itself.)

``pyarrow.fs`` serves datasets only and is not the one abstraction for objects: it has no
ETags (the versions of :class:`ObjectInfo`), no conditional put
(:func:`write_bytes_if_absent`) and no StartAfter (:func:`list_page`, sharded listings).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, Callable, Iterator

import boto3
import botocore.exceptions as bexc
import botocore.session
import tenacity
from botocore.config import Config
from botocore.configprovider import ConfiguredEndpointProvider
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


class AlreadyExists(StorageError):
    """A create-if-absent write found the object already there (another writer won)."""


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


# --------------------------------------------------------------------------- S3 clients

# botocore's own definitions of these settings, changed where the project differs: AWS_REGION (what the other
# AWS SDKs, pyarrow's among them, read) before botocore's AWS_DEFAULT_REGION, and standard retries with 5 attempts
# by default. The environment and the config file still win, as botocore keeps reading them through its chain.
_SESSION_VARS = {
    "region": ("region", ["AWS_REGION", "AWS_DEFAULT_REGION"], None, None),
    "retry_mode": ("retry_mode", "AWS_RETRY_MODE", "standard", None),
    "max_attempts": ("max_attempts", "AWS_MAX_ATTEMPTS", 5, int),
}


@dataclass(frozen=True)
class _S3Connection:
    """A client and what ``pyarrow.fs`` needs to reach the same server with the same identity."""

    session: boto3.session.Session
    client: Any
    custom_endpoint: str | None  # AWS_ENDPOINT_URL_S3 and the like; None for AWS itself


def s3_client() -> Any:
    """A boto3 S3 client configured by boto3's own chain (environment, config files, instance roles).

    Clients are cached per process and per value of the AWS_* variables: boto3 clients are
    thread-safe, a changed variable (a test, a re-pointed job) gets a fresh client, and the pid
    gives a forked Ray worker its own (connection pools do not survive a fork).
    """
    return _connection().client


def _connection() -> _S3Connection:
    # On every S3 operation: walk the keys and read only the AWS_* values (os.environ decodes each value it hands
    # out); 15 us a call instead of 35 for items() with 44 variables on the 2-core box.
    aws_env = tuple(sorted((k, os.environ[k]) for k in os.environ if k.startswith("AWS_")))
    return _cached_connection(aws_env, os.getpid())


@functools.lru_cache(maxsize=16)
def _cached_connection(aws_env: tuple[tuple[str, str], ...], pid: int) -> _S3Connection:
    del aws_env, pid  # cache keys only: botocore reads the environment itself
    core = botocore.session.Session(session_vars=_SESSION_VARS)
    session = boto3.session.Session(botocore_session=core)  # a private session: boto3's default one is not thread-safe
    custom = ConfiguredEndpointProvider(
        full_config=core.full_config, scoped_config=core.get_scoped_config(), client_name="s3"
    ).provide()
    # MinIO and SeaweedFS behind a plain host name need path-style keys, and not all of them implement the CRC
    # checksums boto3 sends to AWS by default.
    compat = dict(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                  response_checksum_validation="when_required") if custom else {}
    config = Config(signature_version="s3v4", connect_timeout=_CONNECT_TIMEOUT_S, read_timeout=_READ_TIMEOUT_S,
                    max_pool_connections=32, **compat)
    try:
        client = session.client("s3", config=config)
    except ValueError as exc:  # botocore's "Invalid endpoint: ..." does not say where the value came from
        raise InvalidValue(f"{exc}: check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (http://host:port)") from None
    return _S3Connection(session, client, custom)


# Buckets confirmed to exist, per (endpoint, bucket): lets a 404 on HEAD be told apart
# (missing key vs. missing bucket) without an extra request each time.
_known_buckets: set[tuple[str, str]] = set()


def clear_client_cache() -> None:
    """Forget cached clients (e.g. after changing ~/.aws/config in a test)."""
    _cached_connection.cache_clear()
    _known_buckets.clear()


_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
    "AllAccessDisabled", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AccountProblem", "InvalidSecurity",
})
# Network failures botocore retries (or, for a cut-off body, _S3Store._get): reaching the caller means it gave up.
_CONNECTION_ERRORS = (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError)
# A response body that stopped early: botocore's StreamingBody raises one or the other.
_CUT_OFF_BODY = (bexc.ResponseStreamingError, bexc.IncompleteReadError)


def _error_code(exc: bexc.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    return str(error.get("Code", "")), int(status)


def _translate(exc: Exception, uri: str, what: str) -> StorageError:
    """Map a botocore exception to a StorageError subclass with a clear message."""
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            return BucketNotFound(f"bucket '{parse_uri(uri).bucket}' does not exist ({uri})")
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"object not found: {uri}")
        if code in _DENIED_CODES or status == 403:
            return PermissionDenied(f"{what}: access denied for {uri} ({code}); {_CREDENTIALS_HINT}")
        message = exc.response.get("Error", {}).get("Message", "")
        meta = exc.response.get("ResponseMetadata", {})
        tries = f" (gave up after {meta.get('RetryAttempts', 0) + 1} attempts)" if meta.get("MaxAttemptsReached") else ""
        return StorageError(f"{what} failed for {uri}: {code or status} {message}{tries}".rstrip())
    if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
        return PermissionDenied(f"{what}: no usable credentials for {uri}; {_CREDENTIALS_HINT}")
    if isinstance(exc, _CONNECTION_ERRORS):
        return StorageError(f"{what} failed for {uri} (gave up after retries): {exc}")
    return StorageError(f"{what} failed for {uri}: {type(exc).__name__}: {exc}")


def _read_body(response: dict[str, Any]) -> bytes:
    try:
        return response["Body"].read()
    except bexc.ReadTimeoutError as exc:  # a stall mid-body: the same type botocore raises for the headers
        raise bexc.ResponseStreamingError(error=exc) from exc


# --------------------------------------------------------------------------- local helpers


def _local_error(exc: OSError, uri: str, what: str) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"file not found: {uri}")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{what}: permission denied for {uri}: {exc}")
    return StorageError(f"{what} failed for {uri}: {exc}")


def _atomic_local_write(path: str, write: Callable[[Any], Any],
                        commit: Callable[[str, str], Any] | None = None) -> None:
    """Write ``path`` via a temp file in the same folder, then ``commit(tmp, path)``: by default ``os.replace``
    (no torn files); a commit that raises leaves no temp file behind."""
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
        (commit or os.replace)(tmp, path)
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


# --------------------------------------------------------------------------- stores
# One class per scheme, the same methods on each; a store is bound to the URI it was made for (``uri`` as the
# caller wrote it, for messages). Listing methods read the URI as a prefix ("folder").


@dataclass(frozen=True)
class _LocalStore:
    uri: str
    path: str  # absolute

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _local_error(exc, self.uri, what) from exc

    def read(self) -> bytes:
        with self._errors("read"), open(self.path, "rb") as fh:
            return fh.read()

    def read_range(self, start: int, length: int) -> bytes:
        with self._errors("read"), open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(length)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with self._errors("write"):
            _atomic_local_write(self.path, lambda fh: fh.write(data))

    def write_if_absent(self, data: bytes) -> None:
        def link(tmp: str, path: str) -> None:
            # A hard link of the finished temp file: atomic, and it fails if the name exists.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(f"already exists: {self.uri}") from None
            os.unlink(tmp)

        with self._errors("write"):
            _atomic_local_write(self.path, lambda fh: fh.write(data), commit=link)

    def stat(self) -> ObjectInfo:
        with self._errors("stat"):
            st = os.stat(self.path)
        if not S_ISREG(st.st_mode):
            raise ObjectNotFound(f"not a file: {self.uri}")
        return ObjectInfo(self.uri, st.st_size, _local_version(st), st.st_mtime)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def delete(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _local_error(exc, self.uri, "delete") from exc

    def entries(self) -> list[tuple[str, int, str]]:
        with self._errors("list"):
            return sorted(_walk_local(self.path))

    def list_page(self, after: str | None, limit: int, suffix: str) -> tuple[list[ListedObject], bool]:
        try:
            with os.scandir(self.path) as entries:
                # The page's names only (limit + 1 tells whether more follow), not a sorted list of the folder.
                names = heapq.nsmallest(limit + 1, (
                    e.name for e in entries if e.name.endswith(suffix) and not e.name.endswith(_TMP_SUFFIX)
                    and (after is None or e.name > after) and e.is_file(follow_symlinks=False)))
        except FileNotFoundError:
            return [], False
        except OSError as exc:
            raise _local_error(exc, self.uri, "list") from exc
        found: list[ListedObject] = []
        for name in names:
            if len(found) == limit:
                return found, True
            try:
                st = os.stat(os.path.join(self.path, name))
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append(ListedObject(name, st.st_size, st.st_mtime))
        return found, False

    def iter_shard(self, shard: tuple[str | None, str | None], index: int, count: int,
                   recursive: bool) -> Iterator[tuple[str, int, str]]:
        # Hash shards of the top-level entries: a folder has no key order to cut into ranges.
        try:
            entries = os.scandir(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _local_error(exc, self.uri, "list") from exc
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

    def fetch(self, dest: Path, progress: Callable[[int], Any] | None) -> None:
        def copy(fh: Any) -> None:
            while chunk := src.read(1 << 20):
                fh.write(chunk)
                if progress:
                    progress(len(chunk))

        with self._errors("copy"), open(self.path, "rb") as src:
            _atomic_local_write(str(dest), copy)

    def local_dir(self) -> Path:
        if not os.path.isdir(self.path):
            raise ObjectNotFound(f"directory not found: {self.uri}")
        return Path(self.path)

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), self.path


@dataclass(frozen=True)
class _S3Store:
    uri: str
    bucket: str
    key: str  # "" for the bucket's root

    @property
    def _prefix(self) -> str:
        """The key as a folder: ``p`` -> ``p/``, so ``s3://b/p`` does not list ``p2/...``."""
        key = self.key.strip("/")
        return key + "/" if key else ""

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
            raise _translate(exc, self.uri, what) from exc

    def _get(self, **extra: str) -> bytes:
        """GET the object; a body cut off midway (not retried by botocore) is fetched again."""
        client = s3_client()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_CUT_OFF_BODY),
            stop=tenacity.stop_after_attempt(client.meta.config.retries["total_max_attempts"]),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=20),  # full jitter, like botocore's
            before_sleep=lambda state: log.warning(
                "GET %s: body cut off (attempt %d): %s; retrying", self.uri, state.attempt_number,
                state.outcome.exception()),
            reraise=True,  # the last error itself, which _errors translates, rather than a tenacity.RetryError
        )
        with self._errors("GET"):
            return retrying(lambda: _read_body(client.get_object(Bucket=self.bucket, Key=self.key, **extra)))

    def read(self) -> bytes:
        return self._get()

    def read_range(self, start: int, length: int) -> bytes:
        return self._get(Range=f"bytes={start}-{start + length - 1}")

    def _put(self, data: bytes | bytearray | memoryview, **extra: str) -> None:
        if not self.key or self.key.endswith("/"):
            raise InvalidURI(f"cannot write an object to a prefix: {self.uri!r}")
        with self._errors("PUT"):
            s3_client().put_object(Bucket=self.bucket, Key=self.key, Body=bytes(data), **extra)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._put(data)

    def write_if_absent(self, data: bytes) -> None:
        try:
            self._put(data, IfNoneMatch="*")
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, bexc.ClientError) and _error_code(cause)[1] in (409, 412):
                raise AlreadyExists(f"already exists: {self.uri}") from None
            raise
        if self.read() != data:  # a server that ignored If-None-Match let a concurrent writer overwrite
            raise AlreadyExists(f"already exists (written concurrently by another run): {self.uri}")

    def _check_bucket(self) -> None:
        """Raise BucketNotFound if the bucket does not exist (called after an ambiguous 404)."""
        client = s3_client()
        known = (client.meta.endpoint_url, self.bucket)
        if known in _known_buckets:
            return
        try:
            with self._errors(f"HEAD bucket {self.bucket}"):
                client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound:  # a HEAD's 404 has no body, so no NoSuchBucket code: here it is the bucket's
            raise BucketNotFound(f"bucket '{self.bucket}' does not exist ({self.uri})") from None
        _known_buckets.add(known)

    def stat(self) -> ObjectInfo:
        try:
            if not self.key:
                raise ObjectNotFound(f"object not found: {self.uri}")
            with self._errors("HEAD"):
                head = s3_client().head_object(Bucket=self.bucket, Key=self.key)
        except ObjectNotFound:
            self._check_bucket()  # a missing bucket is a setup error, not a missing object
            raise
        return ObjectInfo(self.uri, int(head["ContentLength"]), head.get("ETag", "").strip('"'),
                          head["LastModified"].timestamp())

    def exists(self) -> bool:
        try:
            self.stat()
        except ObjectNotFound:
            return False
        return True

    def delete(self) -> None:
        if not self.key:
            raise ValueError(f"refusing to delete a bucket: {self.uri!r}")
        with self._errors("DELETE"):
            s3_client().delete_object(Bucket=self.bucket, Key=self.key)

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The ListObjectsV2 pages of the prefix (botocore retries each page's request)."""
        with self._errors("LIST"):
            yield from s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._prefix, **kwargs)

    def entries(self) -> list[tuple[str, int, str]]:
        prefix = self._prefix
        return sorted(
            (obj["Key"][len(prefix):], int(obj["Size"]), obj.get("ETag", "").strip('"'))
            for page in self._pages() for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")  # "directory marker" objects
        )

    def list_page(self, after: str | None, limit: int, suffix: str) -> tuple[list[ListedObject], bool]:
        # S3 is asked from ``after`` on and stops at the page, so nothing of the prefix's size is held.
        prefix = self._prefix
        start = {"StartAfter": prefix + after} if after is not None else {}
        found: list[ListedObject] = []
        for page in self._pages(Delimiter="/", PaginationConfig={"PageSize": min(1000, max(limit + 1, 1))},
                                **start):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if not name or not name.endswith(suffix):
                    continue
                if len(found) == limit:
                    return found, True
                found.append(ListedObject(name, int(obj["Size"]), obj["LastModified"].timestamp()))
        return found, False

    def iter_shard(self, shard: tuple[str | None, str | None], index: int, count: int,
                   recursive: bool) -> Iterator[tuple[str, int, str]]:
        prefix = self._prefix
        after, upto = shard
        kwargs: dict[str, Any] = {} if recursive else {"Delimiter": "/"}
        if after is not None:
            kwargs["StartAfter"] = prefix + after
        for page in self._pages(**kwargs):
            keys = [(obj["Key"], int(obj["Size"]), obj.get("ETag", "").strip('"')) for obj in page.get("Contents", [])]
            for key, nbytes, version in sorted(keys):
                rel = key[len(prefix):]
                if upto is not None and rel > upto:
                    return
                if rel:
                    yield rel, nbytes, version

    def fetch(self, dest: Path, progress: Callable[[int], Any] | None) -> None:
        # download_fileobj does parallel ranged GETs and retries a part cut off midway itself.
        with self._errors("download"):
            _atomic_local_write(str(dest), lambda fh: s3_client().download_fileobj(
                self.bucket, self.key, fh, Callback=progress))

    def local_dir(self) -> Path:
        return download_prefix(self.uri, local_cache_dir_for(self.uri))

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        conn = _connection()
        client = conn.client
        kwargs: dict[str, Any] = {
            "region": client.meta.region_name,
            "connect_timeout": _CONNECT_TIMEOUT_S,
            "request_timeout": _READ_TIMEOUT_S,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                max_attempts=client.meta.config.retries["total_max_attempts"]),
        }
        credentials = conn.session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        if conn.custom_endpoint:
            scheme, _, host = client.meta.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme.lower())
        return pafs.S3FileSystem(**kwargs), f"{self.bucket}/{self.key}".rstrip("/")


def _store(uri: str) -> _LocalStore | _S3Store:
    """The store that serves ``uri`` (raises InvalidURI for what :func:`parse_uri` refuses)."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        return _S3Store(uri, loc.bucket or "", loc.path)
    return _LocalStore(uri, loc.path)


# --------------------------------------------------------------------------- public I/O


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    return _store(uri).read()


def read_range(uri: str, start: int, length: int) -> bytes:
    """Up to ``length`` bytes from offset ``start`` (a file header without reading the whole object)."""
    return _store(uri).read_range(start, length)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file or object atomically (parents are created locally)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes needs bytes, got {type(data).__name__}")
    _store(uri).write(data)


def write_bytes_if_absent(uri: str, data: bytes) -> None:
    """Create a file or object only if nothing is there yet (commit objects: two runs racing for the same
    version number must not both win). Locally a hard link of a finished temp file (atomic, fails if the name
    exists); on S3 a conditional PUT (``If-None-Match: *``), then a read-back, for servers that ignore the
    condition. Raises :class:`AlreadyExists` when the name is taken."""
    _store(uri).write_if_absent(bytes(data))


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


def stat(uri: str) -> ObjectInfo:
    """Size, version and last write of one file or object; ObjectNotFound if it does not exist."""
    return _store(uri).stat()


def exists(uri: str) -> bool:
    """Whether a file (not a directory) or object exists at ``uri``.

    A missing bucket raises StorageError rather than answering False, so a typo in a bucket
    name does not pass for an empty one.
    """
    return _store(uri).exists()


def size(uri: str) -> int:
    """The size in bytes of a file or object."""
    return stat(uri).size


def delete(uri: str) -> None:
    """Delete a file or object; deleting something that does not exist is not an error."""
    _store(uri).delete()


def list_files(prefix_uri: str) -> list[str]:
    """Full URIs of all files under a prefix, recursively, sorted.

    The prefix is a directory: ``s3://b/p`` lists the keys under ``p/`` (not ``p2/...``).
    Directory-marker keys ending in '/' and in-progress local temp files are skipped; a
    missing prefix lists as empty.  URIs keep the form of ``prefix_uri``.
    """
    return [join_uri(prefix_uri, rel) for rel, _, _ in _store(prefix_uri).entries()]


@dataclass(frozen=True)
class ObjectInfo:
    """A file or object: its URI, size, and a version that changes whenever its content is rewritten
    (the S3 ETag; size and mtime locally). Lets jobs skip unchanged inputs without reading them."""

    uri: str
    size: int
    version: str
    modified: float | None = None  # last write, epoch seconds: set by stat(), not by listings


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """Like :func:`list_files`, with each file's size and version (one LIST, no per-object request)."""
    return [ObjectInfo(join_uri(prefix_uri, rel), n, v) for rel, n, v in _store(prefix_uri).entries()]


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
    return _store(prefix_uri).list_page(after, limit, suffix)


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
    return _store(prefix_uri).iter_shard(shard, index, count, recursive)


# --------------------------------------------------------------------------- copies


def _fetch_one(src_uri: str, dest: Path, progress: Callable[[int], Any] | None = None) -> None:
    """Copy one file or object to ``dest`` atomically, streaming (no whole-file buffering); ``progress`` is
    called with each chunk's size in bytes."""
    _store(src_uri).fetch(dest, progress)


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
    entries = _store(prefix_uri).entries()
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
    return _store(uri).local_dir()


# --------------------------------------------------------------------------- datasets


def pyarrow_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """A ``pyarrow.fs`` filesystem and the path inside it for ``uri``.

    S3 gets an ``S3FileSystem`` pointed at the endpoint, region and credentials that boto3
    resolved for :func:`s3_client`, and the path ``bucket/key``; local paths get
    ``LocalFileSystem`` and the absolute path.
    """
    return _store(uri).pyarrow_filesystem()
