"""Web Push building blocks: VAPID keys and tokens, the endpoint allowlist, encryption.

* :func:`load_vapid_key` reads ``OUTBOX_VAPID_PRIVATE_KEY`` as the base64url raw
  32-byte scalar that most tools print, as PEM (PKCS#8 or SEC 1), or as base64 DER.
* :class:`VapidSigner` signs fresh claims per request (py_vapid, RFC 8292): ``aud``
  is the endpoint's origin, ``exp`` 12 hours ahead (push services refuse more than
  24), ``sub`` the configured contact.
* :func:`endpoint_refusal` is the SSRF guard: only ``https`` endpoints whose host
  matches ``OUTBOX_PUSH_ALLOWED_HOSTS`` (exact names or ``*.suffix``), no user info.
* :func:`keys_refusal` checks a browser's keys: a P-256 point and a 16-byte secret.
* :func:`encrypt` produces the RFC 8291 ``aes128gcm`` body with pywebpush.

Signing and encrypting cost well under a millisecond each (one ECDSA signature, one
ECDH exchange and an AES-GCM pass over at most 4 KB), so they run on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from typing import Any
from urllib.parse import SplitResult, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException
from pywebpush import WebPusher

from outbox._errors import ConfigurationError
from outbox.dispatcher.channels.base import PushSubscription

VAPID_LIFETIME = 12 * 3600
_HOST = re.compile(r"^[a-z0-9.-]+$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _b64decode(text: str) -> bytes:
    text = "".join(text.split())
    return base64.urlsafe_b64decode(
        text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
    )


def b64url(data: bytes) -> str:
    """Unpadded base64url, the encoding of Web Push keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_vapid_key(text: str) -> ec.EllipticCurvePrivateKey:
    """Read a P-256 private key; raise ConfigurationError if it is not one."""
    key: Any
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.strip().encode(), password=None)
        else:
            raw = _b64decode(text)
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError, binascii.Error):
        raise ConfigurationError(
            "OUTBOX_VAPID_PRIVATE_KEY is not a P-256 private key (base64url raw, PEM or DER)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigurationError("OUTBOX_VAPID_PRIVATE_KEY must be a P-256 (prime256v1) key")
    return key


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """Return the application server key browsers subscribe with (base64url)."""
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url(raw)


class VapidSigner:
    """Signs a fresh VAPID token for each request.

    Raises ConfigurationError at construction when ``subject`` is not a ``mailto:``
    or ``https:`` URI.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        self._vapid = Vapid02(private_key=key)
        self._subject = subject
        try:
            self.authorization("https://push.example.com")
        except VapidException as exc:
            raise ConfigurationError(f"OUTBOX_VAPID_SUBJECT is not usable: {exc}") from None

    def authorization(self, audience: str, *, now: float | None = None) -> str:
        """Return the ``Authorization: vapid t=..., k=...`` value for one origin."""
        issued = time.time() if now is None else now
        claims = {"aud": audience, "exp": int(issued) + VAPID_LIFETIME, "sub": self._subject}
        headers = self._vapid.sign(claims)
        return str(headers["Authorization"])


def origin(endpoint: str) -> str:
    """``scheme://host[:port]`` of an endpoint: the VAPID audience."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def host_matches(host: str, pattern: str) -> bool:
    """Exact match, or ``*.example.com`` for any subdomain of example.com."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def endpoint_refusal(
    endpoint: str, allowed_hosts: tuple[str, ...], *, allow_insecure_http: bool = False
) -> str | None:
    """Why ``endpoint`` must not be contacted, or None when it may be.

    ``http`` is accepted only with ``allow_insecure_http`` (tests, the demo) and only
    for a host listed exactly, never through a wildcard.
    """
    try:
        parts: SplitResult = urlsplit(endpoint)
        _ = parts.port  # raises for a malformed port
    except ValueError:
        return "the endpoint is not a valid URL"
    host = (parts.hostname or "").rstrip(".")
    if parts.username is not None or parts.password is not None:
        return "the endpoint carries user info"
    if not host or not _HOST.match(host):
        return "the endpoint has no plain host name"
    if parts.scheme == "https":
        if any(host_matches(host, pattern) for pattern in allowed_hosts):
            return None
    elif parts.scheme == "http" and allow_insecure_http:
        if any(pattern.strip().lower() == host for pattern in allowed_hosts):
            return None
        return f"http endpoint host {host} is not listed exactly in OUTBOX_PUSH_ALLOWED_HOSTS"
    else:
        return f"the endpoint scheme {parts.scheme!r} is not https"
    return f"host {host} is not in OUTBOX_PUSH_ALLOWED_HOSTS"


P256DH_BYTES = 65
"""A browser's ``p256dh``: an uncompressed P-256 point (0x04, then x and y)."""
AUTH_BYTES = 16
"""A browser's ``auth`` secret (RFC 8291)."""


def keys_refusal(p256dh: str, auth: str) -> str | None:
    """Why a subscription's keys could never encrypt a message, or None when they can."""
    try:
        point = _b64decode(p256dh)
        secret = _b64decode(auth)
    except (ValueError, binascii.Error):
        return "the subscription keys are not base64url"
    if len(point) != P256DH_BYTES or point[0] != 4:
        return f"keys.p256dh must be an uncompressed P-256 point ({P256DH_BYTES} bytes)"
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return "keys.p256dh is not a point on P-256"
    if len(secret) != AUTH_BYTES:
        return f"keys.auth must be {AUTH_BYTES} bytes"
    return None


def encrypt(subscription: PushSubscription, body: bytes) -> bytes:
    """Encrypt ``body`` for one subscription (RFC 8291, ``aes128gcm``).

    Raises ValueError when the subscription's keys are malformed.
    """
    info = {
        "endpoint": subscription.endpoint,
        "keys": {"p256dh": subscription.p256dh, "auth": subscription.auth},
    }
    try:
        encoded = WebPusher(info).encode(body, content_encoding="aes128gcm")
        return bytes(encoded["body"])
    except Exception as exc:  # pywebpush and cryptography raise several types here
        raise ValueError(f"cannot encrypt for this subscription: {type(exc).__name__}") from None


def topic_header(topic: str | None) -> str | None:
    """Return a valid ``Topic``: the topic itself, or a stable 32-character digest."""
    if not topic:
        return None
    if _TOPIC.match(topic):
        return topic
    return b64url(hashlib.sha256(topic.encode()).digest())[:32]
