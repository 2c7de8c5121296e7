"""A Web Push service on loopback that checks VAPID and decrypts what it receives.

::

    with PushServer() as push:               # or PushServer(tls=True) for https
        browser = push.subscribe(application_server_key=vapid.public_raw)
        push.respond(browser, 429, retry_after=30, times=1)
        ...  # send to browser.subscription (endpoint, p256dh, auth)
        [received] = push.messages
        received.json(), received.urgency, received.topic, received.vapid_claims

For each ``POST`` to a subscription endpoint the server, like a real push service:

* answers 404 for an unknown endpoint and 410 for one marked with :meth:`expire`;
* requires ``Authorization: vapid t=<JWT>, k=<public key>``: an ES256 signature that
  verifies against ``k``, ``aud`` equal to the server's origin, ``exp`` in the future
  and at most 24 hours ahead, ``sub`` a ``mailto:`` or ``https:`` URI (else 401); if
  the subscription was made for an application server key, ``k`` must be that key
  (else 403, as FCM answers);
* requires ``TTL``, accepts only ``Content-Encoding: aes128gcm``, checks ``Urgency``
  and ``Topic`` (else 400) and the size (over 4096 bytes: 413);
* decrypts the body with the subscription's private key and auth secret (RFC 8291)
  and records the plaintext (else 400).

Scripted answers (:meth:`respond`) take precedence over all checks.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from outbox.dispatcher.channels.base import PushSubscription
from outbox.testing.http_server import HttpRequest, HttpResponse, LoopbackHttpServer
from outbox.testing.tls import LoopbackCertificate

_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_URGENCIES = ("very-low", "low", "normal", "high")
MAX_BODY = 4096


def b64url(data: bytes) -> str:
    """Base64url without padding (as Web Push writes keys)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_raw(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass(frozen=True)
class VapidKeys:
    """An application server key pair in the encodings the settings accept."""

    private_raw: str
    """base64url of the 32-byte private scalar (``OUTBOX_VAPID_PRIVATE_KEY``)."""
    private_pem: str
    public_raw: str
    """base64url of the uncompressed public point (``OUTBOX_VAPID_PUBLIC_KEY``)."""

    @classmethod
    def generate(cls) -> VapidKeys:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        return cls(private_raw=b64url(scalar), private_pem=pem, public_raw=b64url(_public_raw(key)))


@dataclass(frozen=True)
class PushSubscriber:
    """A browser's subscription: the endpoint and the keys only the browser holds."""

    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes
    application_server_key: str | None = None

    @classmethod
    def create(cls, endpoint: str, application_server_key: str | None = None) -> PushSubscriber:
        """Make keys for any endpoint (also one on a host the channel must refuse)."""
        return cls(
            endpoint,
            ec.generate_private_key(ec.SECP256R1()),
            os.urandom(16),
            application_server_key,
        )

    @property
    def p256dh(self) -> str:
        return b64url(_public_raw(self.private_key))

    @property
    def auth(self) -> str:
        return b64url(self.auth_secret)

    @property
    def subscription(self) -> PushSubscription:
        return PushSubscription(endpoint=self.endpoint, p256dh=self.p256dh, auth=self.auth)

    @property
    def info(self) -> dict[str, Any]:
        """The browser's ``PushSubscription.toJSON()``."""
        return {"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}}

    def decrypt(self, body: bytes) -> bytes:
        return bytes(
            http_ece.decrypt(
                body,
                private_key=self.private_key,
                auth_secret=self.auth_secret,
                version="aes128gcm",
            )
        )


@dataclass(frozen=True)
class ReceivedPush:
    """A push message the service accepted and decrypted."""

    endpoint: str
    payload: bytes
    ttl: int
    urgency: str | None
    topic: str | None
    headers: dict[str, str]
    vapid_claims: dict[str, Any]
    vapid_public_key: str
    received_at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True)
class PushRequest:
    """Any request that reached the service, with the status it got."""

    path: str
    status: int
    headers: dict[str, str]
    received_at: float


@dataclass
class _Rule:
    status: int
    remaining: int | None
    headers: dict[str, str] = field(default_factory=dict)


class VapidError(ValueError):
    """The Authorization header does not hold a valid VAPID token for us."""


class PushServer(LoopbackHttpServer):
    """A scriptable Web Push service (``POST /wpush/<id>``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        certificate: LoopbackCertificate | None = None,
        on_message: Callable[[ReceivedPush], None] | None = None,
    ) -> None:
        """``tls`` with ``certificate`` (default: the shared loopback one);
        ``on_message`` is called (on a request thread) with every accepted push.
        """
        super().__init__(host=host, port=port, tls=tls, certificate=certificate)
        self.on_message = on_message
        self._lock = threading.Lock()
        self._subscribers: dict[str, PushSubscriber] = {}
        self._expired: set[str] = set()
        self._rules: dict[str, list[_Rule]] = {}
        self._messages: list[ReceivedPush] = []
        self._requests: list[PushRequest] = []

    # --- subscriptions and scripting ---------------------------------------------

    def subscribe(self, *, application_server_key: str | None = None) -> PushSubscriber:
        """Create a subscription on this service (bound to a VAPID key if given)."""
        path = f"/wpush/{uuid.uuid4().hex}"
        subscriber = PushSubscriber.create(f"{self.url}{path}", application_server_key)
        with self._lock:
            self._subscribers[path] = subscriber
        return subscriber

    def expire(self, subscriber: PushSubscriber) -> None:
        """From now on answer 410 Gone for this subscription."""
        with self._lock:
            self._expired.add(self._path(subscriber))

    def respond(
        self,
        subscriber: PushSubscriber,
        status: int,
        *,
        times: int | None = 1,
        retry_after: int | None = None,
    ) -> None:
        """Answer ``status`` for this subscription ``times`` times (``None``: always)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        with self._lock:
            self._rules.setdefault(self._path(subscriber), []).append(_Rule(status, times, headers))

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._requests.clear()
            self._rules.clear()

    @property
    def messages(self) -> list[ReceivedPush]:
        with self._lock:
            return list(self._messages)

    @property
    def requests(self) -> list[PushRequest]:
        with self._lock:
            return list(self._requests)

    @staticmethod
    def _path(subscriber: PushSubscriber) -> str:
        return "/" + subscriber.endpoint.split("/", 3)[3]

    # --- the service ---------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        response = self._answer(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self._requests.append(
                PushRequest(request.path, response.status, headers, request.received_at)
            )
        return response

    def _answer(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(405)
        with self._lock:
            subscriber = self._subscribers.get(request.path)
            expired = request.path in self._expired
            rules = self._rules.get(request.path, [])
            rule = rules[0] if rules else None
            if rule is not None and rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    rules.remove(rule)
        if rule is not None:
            return HttpResponse(rule.status, b"scripted", dict(rule.headers))
        if subscriber is None:
            return HttpResponse(404, b"no such subscription")
        if expired:
            return HttpResponse(410, b"subscription expired")
        try:
            claims, key = self.verify_vapid(request.headers.get("Authorization") or "")
        except VapidError as exc:
            return HttpResponse(401, str(exc).encode())
        if subscriber.application_server_key not in (None, key):
            return HttpResponse(403, b"VAPID key does not match the subscription")
        error = self._check_headers(request)
        if error is not None:
            return error
        try:
            payload = subscriber.decrypt(request.body)
        except Exception as exc:  # http_ece raises several types
            return HttpResponse(400, f"cannot decrypt: {exc!r}".encode())
        headers = {k.lower(): v for k, v in request.headers.items()}
        received = ReceivedPush(
            endpoint=subscriber.endpoint,
            payload=payload,
            ttl=int(headers["ttl"]),
            urgency=headers.get("urgency"),
            topic=headers.get("topic"),
            headers=headers,
            vapid_claims=claims,
            vapid_public_key=key,
            received_at=request.received_at,
        )
        with self._lock:
            self._messages.append(received)
        if self.on_message is not None:
            self.on_message(received)
        location = f"{self.url}/m/{uuid.uuid4().hex}"
        return HttpResponse(201, b"", {"Location": location, "TTL": str(received.ttl)})

    @staticmethod
    def _check_headers(request: HttpRequest) -> HttpResponse | None:
        ttl = request.headers.get("TTL")
        if ttl is None or not ttl.isdigit():
            return HttpResponse(400, b"missing or invalid TTL header")
        if (request.headers.get("Content-Encoding") or "").lower() != "aes128gcm":
            return HttpResponse(400, b"only aes128gcm is accepted")
        urgency = request.headers.get("Urgency")
        if urgency is not None and urgency not in _URGENCIES:
            return HttpResponse(400, b"invalid Urgency")
        topic = request.headers.get("Topic")
        if topic is not None and not _TOPIC.match(topic):
            return HttpResponse(400, b"invalid Topic")
        if len(request.body) > MAX_BODY:
            return HttpResponse(413, b"payload too large")
        return None

    def verify_vapid(self, authorization: str) -> tuple[dict[str, Any], str]:
        """Check a ``vapid t=..., k=...`` header; return the claims and the key."""
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise VapidError("expected the 'vapid' authorization scheme")
        params = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        token, key = params.get("t", ""), params.get("k", "")
        try:
            header_b64, claims_b64, signature_b64 = token.split(".")
            header = json.loads(b64url_decode(header_b64))
            claims = json.loads(b64url_decode(claims_b64))
            signature = b64url_decode(signature_b64)
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64url_decode(key)
            )
        except ValueError as exc:
            raise VapidError(f"malformed VAPID token: {exc}") from None
        if header.get("alg") != "ES256" or len(signature) != 64:
            raise VapidError("VAPID token must be ES256")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            public.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VapidError("VAPID signature does not verify") from None
        now = time.time()
        if claims.get("aud") != self.url:
            raise VapidError(f"aud {claims.get('aud')!r} is not {self.url!r}")
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= now or exp > now + 86400:
            raise VapidError("exp must be in the future and at most 24 hours ahead")
        sub = str(claims.get("sub", ""))
        if not sub.startswith(("mailto:", "https:")):
            raise VapidError("sub must be a mailto: or https: URI")
        return claims, key
