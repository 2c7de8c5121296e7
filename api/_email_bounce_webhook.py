"""``POST /api/v1/webhooks/email/mailgun``: bounces and complaints after the mail left.

An SMTP server that accepted a message may still fail to deliver it (a mailbox that
does not exist at the next hop) or the recipient may mark it as spam. Mailgun is the
provider: its webhook format and signature are public and simple (an HMAC in the
JSON body, no SDK needed), it signs with a key used for nothing else, and a
timestamp lets a replay be refused. (SendGrid signs with ECDSA over the raw body,
Postmark only offers basic auth or IP allowlists.)

The body is Mailgun's JSON: ``{"signature": {"timestamp", "token", "signature"},
"event-data": {"event", "severity", "recipient", ...}}``. ``signature`` must be the
hex HMAC-SHA256 of ``timestamp + token`` under ``OUTBOX_MAILGUN_WEBHOOK_SIGNING_KEY``
(compared in constant time), ``timestamp`` within :data:`MAX_CLOCK_SKEW_SECONDS`
of now, and the token not seen before by this process. Answers:

===  ============================================================================
200  ``{"marked": n}``: verified. ``failed`` with ``severity: permanent`` (a hard
     bounce) and ``complained`` mark the recipient's address undeliverable for
     every user who has it (``outbox.mark_address_undeliverable``): email stops
     there, messages fall back. ``n`` is 0 for every other event and for a report
     repeated after the address was marked: idempotent
400  not a Mailgun webhook body (no JSON object with ``signature`` and
     ``event-data``, no recipient)
403  a wrong signature, a timestamp outside the window, or a token already used
     (a replay); nothing is written
413  a body over 64 KiB
503  the signing key is not set, or the database does not answer (Mailgun retries)
===  ============================================================================
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from litestar import Request, Response, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec

from outbox._queries import QUERIES
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext, ErrorBody

log = logging.getLogger("outbox.api")

MAX_BODY_BYTES = 64 * 1024
MAX_CLOCK_SKEW_SECONDS = 300.0
"""How far a webhook's timestamp may be from our clock: a captured request replayed
later than this is refused even by a process that never saw its token."""
MAX_ADDRESS_LENGTH = 1024
_REMEMBERED_TOKENS = 10_000
_HEX_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9]{1,200}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")


class TokenMemory:
    """Tokens of verified webhooks within the window: the same request twice is a replay."""

    def __init__(self, capacity: int = _REMEMBERED_TOKENS) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, token: str, now: float) -> bool:
        """Remember ``token``; False when it was used within the window already."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * MAX_CLOCK_SKEW_SECONDS:
                self._seen.popitem(last=False)
            if token in self._seen:
                return False
            self._seen[token] = now
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return True

    def forget(self, token: str) -> None:
        """Let ``token`` in again: its webhook was not processed (Mailgun will retry)."""
        with self._lock:
            self._seen.pop(token, None)


def mailgun_signature(signing_key: str, timestamp: str, token: str) -> str:
    """The hex HMAC-SHA256 Mailgun puts in ``signature.signature``."""
    return hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def _forbidden(detail: str) -> Response[Any]:
    return Response({"status_code": 403, "detail": detail}, status_code=403)


def _bad(detail: str) -> Response[Any]:
    return Response({"status_code": 400, "detail": detail}, status_code=400)


def _reason(event: dict[str, Any]) -> str | None:
    """Why the address is dead, or None when the event says nothing about the address."""
    kind = event.get("event")
    if kind == "complained":
        return "mailgun: the recipient marked a message as spam"
    if kind == "failed" and event.get("severity") == "permanent":
        status = event.get("delivery-status")
        code = status.get("code") if isinstance(status, dict) else None
        detail = f" {code}" if isinstance(code, int) and not isinstance(code, bool) else ""
        return f"mailgun: hard bounce{detail}"
    return None


@post(
    "/api/v1/webhooks/email/mailgun",
    exclude_from_auth=True,
    operation_id="mailgunEmailEvent",
    summary="Mailgun bounce and complaint events (signed; no login)",
    description=__doc__.split("\n\n")[2] if __doc__ else None,
    request_max_body_size=MAX_BODY_BYTES,
    status_code=200,
    responses={
        400: ResponseSpec(data_container=ErrorBody, description="Not a Mailgun webhook body"),
        403: ResponseSpec(data_container=ErrorBody, description="Wrong, old or replayed signature"),
        503: ResponseSpec(
            data_container=ErrorBody, description="No signing key, or the database is down"
        ),
    },
)
async def mailgun_email_event(request: Request[Any, Any, Any]) -> Response[Any]:
    """Verify Mailgun's signature, then mark a hard-bounced or complaining address."""
    context: ApiContext = request.app.state["outbox"]
    key = context.settings.mailgun_webhook_signing_key
    if not key:
        raise ServiceUnavailableException(
            "the email bounce webhook is not configured: set OUTBOX_MAILGUN_WEBHOOK_SIGNING_KEY"
        )
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        return _bad("the body is not JSON")
    signature = body.get("signature") if isinstance(body, dict) else None
    event = body.get("event-data") if isinstance(body, dict) else None
    if not isinstance(signature, dict) or not isinstance(event, dict):
        return _bad("a Mailgun webhook has 'signature' and 'event-data' objects")
    timestamp = str(signature.get("timestamp", ""))
    token, given = signature.get("token"), signature.get("signature")
    if not (
        _TIMESTAMP.match(timestamp)
        and isinstance(token, str)
        and _TOKEN.match(token)
        and isinstance(given, str)
        and _HEX_SIGNATURE.match(given)
    ):
        return _forbidden("the request is not signed by Mailgun")
    expected = mailgun_signature(key.reveal(), timestamp, token)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return _forbidden("the request is not signed by Mailgun")
    now = time.time()
    if abs(now - int(timestamp)) > MAX_CLOCK_SKEW_SECONDS:
        return _forbidden("the signature's timestamp is too old or in the future")
    tokens: TokenMemory = request.app.state["mailgun_tokens"]
    if not tokens.first_use(token, now):
        return _forbidden("this webhook was received already (a replay)")

    reason = _reason(event)
    if reason is None:
        return Response({"marked": 0}, status_code=200)
    address = event.get("recipient")
    if (
        not isinstance(address, str)
        or not address
        or len(address) > MAX_ADDRESS_LENGTH
        or any(ord(char) < 32 or ord(char) == 127 for char in address)
    ):
        return _bad("the event has no usable recipient")
    try:
        async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
            cursor = await conn.execute(
                QUERIES["api_email_bounce"], {"address": address, "reason": reason}
            )
            row = await cursor.fetchone()
    except DB_ERRORS as error:
        tokens.forget(token)
        log.warning("mailgun webhook: database unavailable error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error
    marked = int(row[0]) if row is not None and row[0] is not None else 0
    return Response({"marked": marked}, status_code=200)
