"""``POST /api/v1/webhooks/sms``: Twilio reports whether an SMS reached the phone.

No login: the credential is ``X-Twilio-Signature``, base64 HMAC-SHA1 under the
account's auth token of the URL Twilio was told to call (``StatusCallback``:
``OUTBOX_API_PUBLIC_URL`` + this path, plus the query string if any) followed by
every form field's name and value, sorted by name (the URL with or without its
scheme's default port, as Twilio's own validators accept). It is compared in
constant time; a request whose signature is missing or does not verify gets 403
and touches nothing. Answers:

===  ============================================================================
204  verified: ``delivered`` and ``undelivered``/``failed`` are recorded in
     ``outbox.attempt`` (``outbox.record_delivery_report``), the other statuses
     (``queued``, ``sending``, ``sent``, ``accepted``, ...) only acknowledged; a
     report repeated by Twilio's retries records nothing more, and one for a message
     SID we never sent changes nothing
400  signed, but not a status callback (no ``MessageSid`` or ``MessageStatus``, a
     field given twice, a malformed value)
403  no or a wrong signature
413  a body over 16 KiB (Twilio's callbacks are well under 2 KiB)
503  callbacks are not configured (``OUTBOX_API_PUBLIC_URL`` or
     ``OUTBOX_SMS_AUTH_TOKEN`` unset: nothing could be verified), or the database
     does not answer (Twilio does not retry, the report is lost)
===  ============================================================================

``undelivered`` or ``failed`` with one of :data:`PERMANENT_ERROR_CODES` also marks
the user's number undeliverable, so later messages go to the next channel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import psycopg
from litestar import Request, Response, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec

from outbox._queries import QUERIES
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext, ErrorBody

log = logging.getLogger("outbox.api")

MAX_BODY_BYTES = 16 * 1024
MAX_FIELDS = 64
DELIVERED = frozenset({"delivered"})
UNDELIVERED = frozenset({"undelivered", "failed"})
PERMANENT_ERROR_CODES = frozenset({"21211", "21610", "21614", "30005", "30006"})
"""Twilio error codes after which the number will not receive later messages either:
invalid number (21211), the user replied STOP (21610), not a mobile number (21614),
unknown destination handset (30005), landline or unreachable carrier (30006).
Others (30003 handset off or out of coverage, 30004 blocked, 30007 carrier
filtering, 30008 unknown) are about this message, not the number."""
_MESSAGE_SID = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")
_ERROR_CODE = re.compile(r"^[0-9]{1,10}$")


def twilio_signature(url: str, params: list[tuple[str, str]], auth_token: str) -> str:
    """What ``X-Twilio-Signature`` must be for a form POST of ``params`` to ``url``."""
    material = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), material.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signed_url_variants(url: str) -> tuple[str, ...]:
    """``url`` as configured, with the scheme's default port and without it.

    Twilio signs the URL as it called it, and has been seen to add or drop a default
    port (``:443``) on the way; its own validators accept both spellings, so this
    does too. Nothing else about the URL may differ.
    """
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if default is None or parts.port not in (None, default):
        return (url,)
    userless = [
        urlunsplit(parts._replace(netloc=f"{host}:{default}")),
        urlunsplit(parts._replace(netloc=host)),
    ]
    return tuple(dict.fromkeys([url, *userless]))


def _forbidden() -> Response[Any]:
    return Response(
        {"status_code": 403, "detail": "the request is not signed by Twilio"}, status_code=403
    )


def _bad(detail: str) -> Response[Any]:
    return Response({"status_code": 400, "detail": detail}, status_code=400)


@post(
    "/api/v1/webhooks/sms",
    exclude_from_auth=True,
    operation_id="smsStatusCallback",
    summary="Twilio status callback for an SMS (signed; no login)",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    request_max_body_size=MAX_BODY_BYTES,
    # each answer sets its status; Litestar allows no Response return with a 204 default
    status_code=200,
    responses={
        204: ResponseSpec(data_container=None, description="Verified (recorded or not final)"),
        400: ResponseSpec(data_container=ErrorBody, description="Signed, but not a callback"),
        403: ResponseSpec(data_container=ErrorBody, description="Missing or wrong signature"),
        413: ResponseSpec(data_container=ErrorBody, description="Body over 16 KiB"),
        503: ResponseSpec(
            data_container=ErrorBody,
            description="Callbacks not configured, or the database is unavailable",
        ),
    },
)
async def sms_status_callback(request: Request[Any, Any, Any]) -> Response[Any]:
    """Verify Twilio's signature, then record a final delivery status."""
    context: ApiContext = request.app.state["outbox"]
    settings = context.settings
    url = settings.sms_status_callback_url
    if url is None or not settings.sms_auth_token:
        raise ServiceUnavailableException(
            "SMS status callbacks are not configured: set OUTBOX_API_PUBLIC_URL and"
            " OUTBOX_SMS_AUTH_TOKEN"
        )
    query = request.scope.get("query_string", b"").decode("latin-1")
    signed_url = f"{url}?{query}" if query else url
    body = await request.body()
    try:
        params = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=MAX_FIELDS,
        )
    except ValueError:  # not a form, or too many fields: nothing Twilio signed
        return _forbidden()
    given = request.headers.get("X-Twilio-Signature", "").encode()
    token = settings.sms_auth_token.reveal()
    verified = [
        hmac.compare_digest(given, twilio_signature(candidate, params, token).encode())
        for candidate in signed_url_variants(signed_url)
    ]
    if not given or not any(verified):
        return _forbidden()

    form = dict(params)
    if len(form) != len(params):
        return _bad("a field is given twice")
    sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "")
    if not _MESSAGE_SID.match(sid) or not status:
        return _bad("a status callback needs MessageSid and MessageStatus")
    if status not in DELIVERED | UNDELIVERED:
        return Response(None, status_code=204)  # on its way: nothing to record yet
    code = form.get("ErrorCode") or None
    if code is not None and not _ERROR_CODE.match(code):
        return _bad("ErrorCode must be a number")
    delivered = status in DELIVERED
    params_sql = {
        "provider_id": sid,
        "delivered": delivered,
        "error_code": None if delivered else code,
        "permanent": not delivered and code in PERMANENT_ERROR_CODES,
    }
    try:
        async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
            row = await (
                await conn.execute(QUERIES["api_sms_delivery_report"], params_sql)
            ).fetchone()
    except psycopg.errors.UndefinedFunction as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except DB_ERRORS as error:
        log.warning("sms callback: database unavailable error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error
    if row is None or row[0] is None:
        # signed by our account, but for no message we sent (another application on
        # the account, or history pruned): acknowledged so Twilio does not insist
        log.info("sms callback for an unknown message sid=%s status=%s", sid, status)
    return Response(None, status_code=204)
