"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (the SeaweedFS of s3_server.py).

Each client connection carries one request: the proxy reads it (headers and a Content-Length body), forwards it
with ``Connection: close`` and relays the whole response, marked ``Connection: close`` as well, so that request
boundaries never need parsing on a kept-alive connection. Faults are queued and taken in order by the requests
whose method they name (``None``: any method)::

    with FlakyProxy(s3.endpoint) as proxy:
        proxy.fail_next(2)                  # the next 2 requests get a 503 SlowDown and never reach the server
        proxy.cut_next(1, after=100)        # the next GET's response stops 100 bytes into its body
        proxy.requests                      # [(method, path), ...], every request seen
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
              b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
_HOP_BY_HOP = (b"connection:", b"keep-alive:", b"expect:")


@dataclass
class _Fault:
    count: int
    method: str | None
    status: int | None = None  # answer with this status instead of forwarding
    cut_after: int | None = None  # forward, but drop the connection this many bytes into the response body


def _read_until(sock: socket.socket, buffer: bytes, marker: bytes) -> tuple[bytes, bytes]:
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed before the end of the headers")
        buffer += chunk
    head, _, rest = buffer.partition(marker)
    return head, rest


def _close_after(head: bytes) -> bytes:
    """Headers without hop-by-hop fields, plus ``Connection: close``."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(_HOP_BY_HOP)]
    return b"\r\n".join([*lines, b"Connection: close"])


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, count: int, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``count`` requests (of ``method``) with ``status`` and an S3 SlowDown error."""
        with self._lock:
            self._faults.append(_Fault(count, method, status=status))

    def cut_next(self, count: int, after: int, method: str | None = "GET") -> None:
        """Drop the connection ``after`` bytes into the response body of the next ``count`` requests."""
        with self._lock:
            self._faults.append(_Fault(count, method, cut_after=after))

    def count(self, method: str) -> int:
        """How many requests of ``method`` came through so far."""
        with self._lock:
            return sum(m == method for m, _ in self.requests)

    def _take_fault(self, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in (None, method):
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, client: socket.socket) -> None:
        try:
            head, body = _read_until(client, b"", b"\r\n\r\n")
        except ConnectionError:
            return
        lines = head.split(b"\r\n")
        method, path, _ = lines[0].decode().split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if headers.get(b"expect", b"").lower() == b"100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(headers.get(b"content-length", b"0"))
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                return
            body += chunk
        with self._lock:
            self.requests.append((method, path))
        fault = self._take_fault(method)
        if fault is not None and fault.status is not None:
            client.sendall(b"HTTP/1.1 %d Injected Fault\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n%s" % (fault.status, len(_SLOW_DOWN), _SLOW_DOWN))
            return
        with socket.create_connection(self._upstream, timeout=30) as upstream:
            upstream.sendall(_close_after(head) + b"\r\n\r\n" + body)
            response = b""
            while chunk := upstream.recv(65536):
                response += chunk
        response_head, _, response_body = response.partition(b"\r\n\r\n")
        if fault is not None and fault.cut_after is not None:
            response_body = response_body[:fault.cut_after]
        client.sendall(_close_after(response_head) + b"\r\n\r\n" + response_body)
