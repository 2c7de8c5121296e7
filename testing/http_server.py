"""A threaded HTTP/1.1 server on loopback that the Telegram and push servers build on.

Subclasses implement :meth:`LoopbackHttpServer.handle`, a plain function from
:class:`HttpRequest` to :class:`HttpResponse`, called on a worker thread per
connection. Connections are kept alive (clients reuse them, as httpx does), and
:meth:`~LoopbackHttpServer.stop` closes them all, so a stopped server looks down
to a client that holds a pooled connection. With ``tls=True`` the server speaks
HTTPS with the certificate from :mod:`outbox.testing.tls`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from outbox.testing import tls as tls_helpers


@dataclass(frozen=True)
class HttpRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    received_at: float
    """``time.monotonic()`` on arrival (on Linux, when the kernel received the first
    bytes of the request, so a busy server thread does not skew rate measurements)."""


@dataclass
class HttpResponse:
    """What :meth:`LoopbackHttpServer.handle` answers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Self:
        return cls(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )


# Linux: the kernel stamps each packet on arrival (SO_TIMESTAMPNS, CLOCK_REALTIME).
_SO_TIMESTAMPNS = 35 if sys.platform == "linux" else None
_TIMESPEC = struct.Struct("@qq")


def _kernel_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp arrivals on ``sock``; False where that is not possible."""
    if _SO_TIMESTAMPNS is None or not hasattr(sock, "recvmsg") or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _arrival(sock: socket.socket) -> float | None:
    """Wait for the next request's first bytes; ``time.monotonic()`` when they arrived.

    Peeks, so the request is still there for the handler to read. A request stamped
    when a busy server thread gets round to it would look later than it was; what a
    rate limit is about is when it reached the machine.
    """
    try:
        data, ancillary, _flags, _address = sock.recvmsg(
            1, socket.CMSG_SPACE(_TIMESPEC.size), socket.MSG_PEEK
        )
    except OSError:
        return None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and data:
            seconds, nanoseconds = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
            sent_at: float = seconds + nanoseconds / 1e9
            return time.monotonic() - (time.time() - sent_at)
    return None


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._stamped = _kernel_timestamps(self.connection)
        self._arrived: float | None = None

    def handle_one_request(self) -> None:
        # httpx never pipelines, so between requests the read buffer is empty and the
        # next request's bytes wait in the kernel, with their arrival stamp.
        self._arrived = _arrival(self.connection) if self._stamped else None
        super().handle_one_request()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = HttpRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers=self.headers,
            body=body,
            received_at=self._arrived or time.monotonic(),
        )
        try:
            response = self.server.owner.handle(request)
        except Exception as exc:  # a bug in a test server must show, not hang the client
            response = HttpResponse(500, f"test server error: {exc!r}".encode())
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: LoopbackHttpServer, address: tuple[str, int]) -> None:
        self.owner = owner
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.owner._ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.live_lock:
            self.live.discard(request)
            self.live.add(wrapped)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            with self.live_lock:
                self.live.discard(wrapped)
            with contextlib.suppress(OSError):
                wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or a connection closed by stop() is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError | TimeoutError):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def close_live(self) -> None:
        with self.live_lock:
            live = list(self.live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class LoopbackHttpServer:
    """Base of the loopback HTTP servers: lifecycle, TLS, live-connection tracking."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        certificate: tls_helpers.LoopbackCertificate | None = None,
    ) -> None:
        """``tls``: serve HTTPS with ``certificate`` (default: the process's shared
        loopback certificate, :func:`outbox.testing.tls.loopback_certificate`).
        """
        self.host = host
        self.port = port
        self.tls = tls
        self._certificate = certificate
        bundle = certificate or (tls_helpers.loopback_certificate() if tls else None)
        self._ssl_context = bundle.server_context() if tls and bundle else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (runs on a worker thread)."""
        raise NotImplementedError

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """``scheme://127.0.0.1:port`` (no trailing slash)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this server's certificate."""
        if self._certificate is not None:
            return ssl.create_default_context(cafile=str(self._certificate.ca_file))
        return tls_helpers.client_context()

    def start(self) -> Self:
        """Listen (on the same port as before when restarted); return self."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        server = _Server(self, (self.host, self.port))
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening and close every live connection."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_live()
        server.server_close()
        thread.join(timeout=10)
        self._server = self._thread = None

    def disconnect_clients(self) -> None:
        """Close live connections but keep listening."""
        if self._server is not None:
            self._server.close_live()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
