"""SMS through Twilio's Messages REST API, over one shared httpx client.

One message is one ``POST {OUTBOX_SMS_API_URL}/2010-04-01/Accounts/{sid}/Messages.json``
with the form fields ``To`` (the user's E.164 number, ``Recipient.addresses["sms"]``),
``From`` (or ``MessagingServiceSid`` when ``OUTBOX_SMS_FROM`` is one), ``Body`` and,
when ``OUTBOX_API_PUBLIC_URL`` is set, ``StatusCallback`` (the API's
``/api/v1/webhooks/sms``, where Twilio reports delivery). HTTP basic authentication
with the account SID and the auth token. Twilio answers errors as
``{"code": 21211, "message": "...", "more_info": "...", "status": 400}``.

What ``send`` answers (it never raises for provider errors):

=============================================  ========================================
no account SID, auth token or sender set       ``Unreachable("not_configured")``
recipient has no SMS number                    ``Unreachable("no_address")``
201 with the message SID                       ``Sent`` (provider id: the ``SM...`` SID)
429                                            ``RateLimited`` for ``Retry-After``
                                               seconds (1 when absent, at most 3600)
code 21211 (invalid ``To``), 21614 (not a      ``Unreachable("sms_invalid_number")``
mobile number), or a stored number that is     with ``MarkAddressUndeliverable("sms")``
not E.164
code 21610 (the user answered STOP)            ``Unreachable("sms_unsubscribed")`` with
                                               ``DisableChannel("sms")``
401 or code 20003 (wrong SID or token)         ``ChannelOutage("sms_auth")``: breaker
5xx                                            ``TransientFailure("sms_5xx")``
timeout or network error                       ``TransientFailure("sms_network")``
any other 4xx                                  ``PermanentFailure("sms_rejected")``
=============================================  ========================================

A timeout after Twilio accepted the request may send the SMS twice on retry: the
at-least-once duplicate the design accepts (Twilio has no idempotency key for
Messages). The auth token travels only in the ``Authorization`` header; error texts
are scrubbed of it.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from typing import Any

import httpx

from outbox._settings import Settings
from outbox.dispatcher.channels._redaction import describe_error, redact
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableChannel,
    Envelope,
    MarkAddressUndeliverable,
    Outcome,
    PermanentFailure,
    RateLimited,
    RenderedSms,
    Sent,
    TransientFailure,
    Unreachable,
    wait_for_slot,
)

logger = logging.getLogger(__name__)

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
INVALID_NUMBER_CODES = frozenset({21211, 21614})
"""Twilio: ``To`` is not a valid phone number; ``To`` is not a mobile number."""
UNSUBSCRIBED_CODE = 21610
"""Twilio: the recipient replied STOP to this sender; Twilio refuses until START."""
AUTHENTICATION_CODE = 20003
DEFAULT_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 3600.0
_MESSAGE_SID = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")


def _retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), bounded."""
    if not value:
        return DEFAULT_RETRY_AFTER
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
    if seconds != seconds:  # NaN
        return DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _error_body(response: httpx.Response) -> tuple[int | None, str]:
    """Twilio's error ``code`` and ``message`` (None and the reason phrase without them)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return None, response.reason_phrase or "no description"
    code = body.get("code")
    message = body.get("message")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        str(message) if message else response.reason_phrase or "no description",
    )


class SmsChannel:
    """Sends :class:`RenderedSms` texts through Twilio.

    Without an account SID, auth token and sender every send answers
    ``Unreachable("not_configured")``, so messages fall back to the user's other
    channels. ``transport`` replaces httpx's network transport (``httpx.MockTransport``
    in unit tests, one trusting a test certificate); ``timeout_seconds`` bounds each
    request (``OUTBOX_SMS_TIMEOUT_SECONDS`` by default).
    """

    name: str = "sms"

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        self._configured = settings.sms_configured
        if not self._configured:
            logger.warning(
                "OUTBOX_SMS_ACCOUNT_SID, OUTBOX_SMS_AUTH_TOKEN or OUTBOX_SMS_FROM is not"
                " set: SMS messages fall back"
            )
        self._token = settings.sms_auth_token
        self._sender_field = "MessagingServiceSid" if settings.sms_from[:2] == "MG" else "From"
        self._sender = settings.sms_from
        self._status_callback = settings.sms_status_callback_url
        timeout = timeout_seconds or settings.sms_timeout_seconds
        self._path = f"/2010-04-01/Accounts/{settings.sms_account_sid}/Messages.json"
        self._client = httpx.AsyncClient(
            base_url=settings.sms_api_url,
            transport=transport,
            auth=httpx.BasicAuth(settings.sms_account_sid, self._token.reveal()),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=False,
            headers={"User-Agent": "outbox-dispatcher", "Accept": "application/json"},
        )

    async def send(self, envelope: Envelope) -> Outcome:
        """Send one text; see the module docstring for the classification."""
        content = envelope.content
        if not isinstance(content, RenderedSms):
            return PermanentFailure(
                error_class="wrong_content", error=f"sms cannot send {type(content).__name__}"
            )
        if not self._configured:
            return Unreachable(error_class="not_configured", error="no Twilio account is set")
        number = envelope.recipient.addresses.get("sms")
        if number is None:
            return Unreachable(error_class="no_address", error="the user has no SMS number")
        if not E164.match(number):
            return Unreachable(
                error_class="sms_invalid_number",
                error="the stored number is not E.164",
                effects=(MarkAddressUndeliverable(channel="sms"),),
            )
        form: dict[str, Any] = {
            "To": number,
            self._sender_field: self._sender,
            "Body": content.text,
        }
        if self._status_callback is not None:
            form["StatusCallback"] = self._status_callback
        secrets = (self._token.reveal(),)
        await wait_for_slot(envelope, 0)
        try:
            response = await self._client.post(self._path, data=form)
        except httpx.HTTPError as exc:
            return TransientFailure(error_class="sms_network", error=describe_error(exc, secrets))
        return self._classify(response, secrets)

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    @staticmethod
    def _classify(response: httpx.Response, secrets: tuple[str, ...]) -> Outcome:
        status = response.status_code
        if 200 <= status < 300:
            try:
                body = response.json()
            except ValueError:
                body = None
            sid = body.get("sid") if isinstance(body, dict) else None
            if isinstance(sid, str) and _MESSAGE_SID.match(sid):
                return Sent(provider_id=sid)
            # accepted all the same: sending again would duplicate the text
            logger.warning("Twilio accepted an SMS without a message SID (status %s)", status)
            return Sent()
        code, message = _error_body(response)
        error = redact(f"{status} {code if code is not None else '-'} {message}", secrets)
        if status == 429:
            return RateLimited(
                retry_after=_retry_after(response.headers.get("Retry-After")), error=error
            )
        if status == 401 or code == AUTHENTICATION_CODE:
            return ChannelOutage(error_class="sms_auth", error=error)
        if status >= 500:
            return TransientFailure(error_class="sms_5xx", error=error)
        if code in INVALID_NUMBER_CODES:
            return Unreachable(
                error_class="sms_invalid_number",
                error=error,
                effects=(MarkAddressUndeliverable(channel="sms"),),
            )
        if code == UNSUBSCRIBED_CODE:
            return Unreachable(
                error_class="sms_unsubscribed",
                error=error,
                effects=(DisableChannel(channel="sms"),),
            )
        return PermanentFailure(error_class="sms_rejected", error=error)
