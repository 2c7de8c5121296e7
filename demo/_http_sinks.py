"""The Telegram Bot API and a Web Push service on loopback, for the demo.

* :class:`TelegramSink` answers ``sendMessage`` like the Bot API and appends each
  accepted message to ``telegram.jsonl``; chats in ``blocked`` get ``403 Forbidden:
  bot was blocked by the user``, chats in ``flaky`` a ``500`` that many times first.
* :class:`PushSink` is a Web Push service on ``https``: it checks the VAPID token,
  decrypts the ``aes128gcm`` body with the subscription's keys (which it made, as a
  browser would) and appends the notification to ``push.jsonl``; subscriptions
  marked gone get ``410 Gone``.

Both run a threaded ``http.server`` (keep-alive, so the dispatchers' pooled
connections are reused) on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from outbox.demo._credentials import b64url, b64url_decode, public_key_raw
from outbox.demo._sinks import HOST, Countdown, JsonLines


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    timeout = 30
    server: _HttpServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            answer = self.server.sink.handle(self.path, dict(self.headers.items()), body)
        except Exception as error:  # a bug in a sink must show, not hang the dispatcher
            answer = _Answer(500, f"demo sink error: {error!r}".encode(), "text/plain")
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log line."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sink: _HttpSink, context: ssl.SSLContext | None) -> None:
        self.sink = sink
        self.context = context
        super().__init__((HOST, 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            with contextlib.suppress(OSError):
                wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up are normal here; nothing to report."""


class _HttpSink:
    """A threaded HTTP(S) server calling :meth:`handle` for every POST."""

    scheme = "http"

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self._context = context
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``scheme://127.0.0.1:port``."""
        return f"{self.scheme}://{HOST}:{self.port}"

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        """Answer one request (on a worker thread)."""
        raise NotImplementedError

    def start(self) -> Any:
        """Listen on a free port; return self."""
        self._server = _HttpServer(self, self._context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; idle keep-alive threads end with their clients."""
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = self._thread = None


def _json(status: int, payload: Mapping[str, Any]) -> _Answer:
    return _Answer(status, json.dumps(payload).encode())


class TelegramSink(_HttpSink):
    """``POST /bot<token>/sendMessage``, answered like the Bot API."""

    def __init__(
        self,
        record_file: Path,
        *,
        token: str,
        blocked: Iterable[int] = (),
        flaky: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.token = token
        self._records = JsonLines(record_file)
        self._blocked = set(blocked)
        self._flaky = Countdown({str(chat): n for chat, n in (flaky or {}).items()})
        self._next_id = 1
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Messages accepted so far."""
        return self._records.count

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        """Answer ``sendMessage``."""
        if path != f"/bot{self.token}/sendMessage":
            return _json(404, {"ok": False, "error_code": 404, "description": "Not Found"})
        try:
            params = json.loads(body or b"{}")
            chat_id = int(params["chat_id"])
            text = str(params["text"])
        except (ValueError, KeyError, TypeError):
            return _json(400, {"ok": False, "error_code": 400, "description": "Bad Request"})
        if chat_id in self._blocked:
            description = "Forbidden: bot was blocked by the user"
            return _json(403, {"ok": False, "error_code": 403, "description": description})
        if self._flaky.take(str(chat_id)):
            description = "Internal Server Error"
            return _json(500, {"ok": False, "error_code": 500, "description": description})
        with self._lock:
            message_id, self._next_id = self._next_id, self._next_id + 1
        self._records.append(
            {
                "chat_id": chat_id,
                "message_id": message_id,
                "parse_mode": params.get("parse_mode"),
                "text": text,
            }
        )
        result = {"message_id": message_id, "chat": {"id": chat_id, "type": "private"}}
        return _json(200, {"ok": True, "result": result})


@dataclass(frozen=True)
class _Browser:
    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes
    user_id: str


class VapidError(ValueError):
    """The request's VAPID token does not check out."""


class PushSink(_HttpSink):
    """A Web Push service: ``POST /push/<id>`` with VAPID and ``aes128gcm``."""

    scheme = "https"

    def __init__(
        self, record_file: Path, *, context: ssl.SSLContext, vapid_public_key: str
    ) -> None:
        super().__init__(context)
        self._records = JsonLines(record_file)
        self._vapid_key = vapid_public_key
        self._browsers: dict[str, _Browser] = {}
        self._gone: set[str] = set()
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Notifications accepted so far."""
        return self._records.count

    def subscribe(self, user_id: str, *, gone: bool = False) -> dict[str, Any]:
        """A browser subscribes: its ``PushSubscription.toJSON()``.

        With ``gone`` the subscription answers ``410 Gone`` (the user uninstalled or
        revoked it), as push services do.
        """
        path = f"/push/{uuid.uuid4().hex}"
        browser = _Browser(ec.generate_private_key(ec.SECP256R1()), os.urandom(16), user_id)
        with self._lock:
            self._browsers[path] = browser
            if gone:
                self._gone.add(path)
        return {
            "endpoint": f"{self.url}{path}",
            "keys": {
                "p256dh": b64url(public_key_raw(browser.private_key)),
                "auth": b64url(browser.auth_secret),
            },
        }

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        """Check VAPID, decrypt, record."""
        with self._lock:
            browser = self._browsers.get(path)
            gone = path in self._gone
        if browser is None:
            return _Answer(404, b"no such subscription", "text/plain")
        if gone:
            return _Answer(410, b"subscription expired", "text/plain")
        lowered = {name.lower(): value for name, value in headers.items()}
        try:
            self._verify_vapid(lowered.get("authorization", ""))
        except VapidError as error:
            return _Answer(401, str(error).encode(), "text/plain")
        if lowered.get("content-encoding", "").lower() != "aes128gcm":
            return _Answer(400, b"only aes128gcm is accepted", "text/plain")
        try:
            payload = http_ece.decrypt(
                body,
                private_key=browser.private_key,
                auth_secret=browser.auth_secret,
                version="aes128gcm",
            )
            notification = json.loads(payload)
        except Exception:  # http_ece raises several types for a bad body
            return _Answer(400, b"cannot decrypt", "text/plain")
        self._records.append(
            {
                "user_id": browser.user_id,
                "urgency": lowered.get("urgency"),
                "topic": lowered.get("topic"),
                "ttl": lowered.get("ttl"),
                "notification": notification,
            }
        )
        location = f"{self.url}/message/{uuid.uuid4().hex}"
        return _Answer(201, b"", "text/plain", (("Location", location),))

    def _verify_vapid(self, authorization: str) -> None:
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise VapidError("expected the vapid authorization scheme")
        params = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        token, key = params.get("t", ""), params.get("k", "")
        if key.rstrip("=") != self._vapid_key.rstrip("="):
            raise VapidError("unknown application server key")
        try:
            header_b64, claims_b64, signature_b64 = token.split(".")
            claims = json.loads(b64url_decode(claims_b64))
            signature = b64url_decode(signature_b64)
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64url_decode(key)
            )
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature):
            raise VapidError("the VAPID token does not verify") from None
        if claims.get("aud") != self.url:
            raise VapidError("the VAPID audience is not this push service")
