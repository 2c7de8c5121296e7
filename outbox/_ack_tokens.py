"""Acknowledgement tokens: signed, expiring, bound to one message.

An alert that waits for its acknowledgement carries a link, ``<public url>/ack/<token>``,
that acknowledges it without a login. Whoever holds the link may acknowledge that one
message until the token expires, and nothing else: the token names the message and
its expiry, and a MAC under a key only the dispatcher and the API know covers both.

A token is ``v1.`` and then the URL-safe base64 (no padding) of 32 bytes::

    message id    8 bytes, unsigned big-endian
    expires at    8 bytes, unsigned big-endian, epoch seconds
    MAC          16 bytes: HMAC-SHA256(key, b"v1." + id + expiry), its first half

The version prefix is inside the MAC too, so a later layout can never have a v1 tag
accepted for it. Tokens are 46 characters: short enough for an SMS or a Telegram
message, and the same length for every message, so any other length is refused
before anything is decoded.

Why half of the MAC is enough: forging a token means producing a tag for a payload
nobody signed, and without the key every try is one request to the API (throttled
per client address) with a chance of 2**-128. HMAC truncated to half its output and
no fewer than 80 bits keeps its strength against forgery (RFC 2104 section 5, NIST
SP 800-107); the other 16 bytes would add 21 characters to every link and nothing an
attacker could reach.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import struct
import time

from outbox._errors import InvalidAckToken

VERSION_PREFIX = "v1."
MAC_BYTES = 16
_PAYLOAD = struct.Struct(">QQ")
TOKEN_CHARS = len(VERSION_PREFIX) + math.ceil((_PAYLOAD.size + MAC_BYTES) * 4 / 3)
"""Every v1 token is exactly this long (46)."""
MAX_MESSAGE_ID = 2**63 - 1
"""``outbox.message.id`` is a bigint identity."""
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def sign(message_id: int, *, key: bytes, ttl_seconds: float, now: float | None = None) -> str:
    """Return a token that acknowledges ``message_id`` until ``ttl_seconds`` from ``now``.

    ``now`` is epoch seconds (``time.time()`` by default). A message id that is not a
    positive bigint, a ttl that is not a positive finite number, or an empty key is a
    programming error (``ValueError``), not a token problem.
    """
    if not key:
        raise ValueError("an acknowledgement token needs a signing key")
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise ValueError(f"message_id must be an int, not {type(message_id).__name__}")
    if not 1 <= message_id <= MAX_MESSAGE_ID:
        raise ValueError(f"message_id must be a positive bigint, not {message_id}")
    if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
        raise ValueError(f"ttl_seconds must be a positive number, not {ttl_seconds!r}")
    issued = time.time() if now is None else now
    expires_at = int(issued + ttl_seconds)
    if not 0 <= expires_at < 2**64:
        raise ValueError(f"the expiry {expires_at} does not fit a token")
    payload = _PAYLOAD.pack(message_id, expires_at)
    return VERSION_PREFIX + _encode(payload + _mac(key, payload))


def verify(token: str, *, key: bytes, now: float | None = None) -> int:
    """Return the message id ``token`` acknowledges, if it is genuine and not expired.

    Raises :class:`~outbox.InvalidAckToken`, with one message whatever the reason
    (forged, tampered, signed with another key, expired, malformed, too long), so
    the answer to a bad link says nothing about what is wrong with it. A token stops
    verifying at its expiry second.
    """
    if not key:
        raise ValueError("an acknowledgement token needs a signing key")
    # the length first: a megabyte of path is refused without being looked at
    if not isinstance(token, str) or len(token) != TOKEN_CHARS:
        raise InvalidAckToken()
    if not token.startswith(VERSION_PREFIX):
        raise InvalidAckToken()
    body = token[len(VERSION_PREFIX) :]
    if not _BASE64URL.fullmatch(body):
        raise InvalidAckToken()
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    # base64 leaves spare bits in the last character: only the one spelling that
    # encoding produces is accepted, so no two strings are the same token
    if _encode(raw) != body:
        raise InvalidAckToken()
    payload, tag = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
    if not hmac.compare_digest(tag, _mac(key, payload)):
        raise InvalidAckToken()
    message_id, expires_at = _PAYLOAD.unpack(payload)
    if (time.time() if now is None else now) >= expires_at:
        raise InvalidAckToken()
    if not 1 <= message_id <= MAX_MESSAGE_ID:
        raise InvalidAckToken()  # never signed by sign(); refused all the same
    return int(message_id)


def _mac(key: bytes, payload: bytes) -> bytes:
    signed = VERSION_PREFIX.encode() + payload
    return hmac.new(key, signed, hashlib.sha256).digest()[:MAC_BYTES]


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
