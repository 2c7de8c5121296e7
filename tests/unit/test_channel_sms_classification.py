"""SmsChannel with httpx.MockTransport: the request Twilio gets, classification, token hygiene."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableChannel,
    MarkAddressUndeliverable,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.dispatcher.channels.sms import SmsChannel
from outbox.testing.envelopes import email_envelope, sms_envelope

ACCOUNT = "AC" + "1f" * 16
TOKEN = "unit-twilio-auth-token-0123456789"
SID = "SM" + "ab" * 16


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sms_account_sid": ACCOUNT,
        "sms_auth_token": Secret(TOKEN),
        "sms_from": "+15005550006",
        "sms_api_url": "https://api.twilio.test",
        "api_public_url": "https://outbox.example",
        **overrides,
    }
    return Settings(**values)


def twilio_error(status: int, code: int, message: str, **headers: str) -> httpx.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return httpx.Response(status, json=body, headers=headers)


class Recorder:
    def __init__(self, answer: httpx.Response | Exception | None = None) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer or httpx.Response(201, json={"sid": SID, "status": "queued"})

    def form(self, index: int = 0) -> dict[str, str]:
        parsed = parse_qs(self.requests[index].content.decode(), strict_parsing=True)
        return {key: values[-1] for key, values in parsed.items()}


async def send(
    recorder: Callable[[httpx.Request], httpx.Response], envelope: Any = None, **overrides: Any
) -> Outcome:
    channel = SmsChannel(settings(**overrides), transport=httpx.MockTransport(recorder))
    try:
        return await channel.send(envelope or sms_envelope())
    finally:
        await channel.aclose()


async def test_a_message_is_one_form_post_with_basic_auth_and_the_status_callback() -> None:
    recorder = Recorder()
    outcome = await send(recorder, sms_envelope("+447700900123", "Stop loss failed on EURUSD"))
    assert outcome == Sent(provider_id=SID)
    [request] = recorder.requests
    assert request.method == "POST"
    assert (
        str(request.url) == f"https://api.twilio.test/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    )
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    credentials = base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {credentials}"
    assert recorder.form() == {
        "To": "+447700900123",
        "From": "+15005550006",
        "Body": "Stop loss failed on EURUSD",
        "StatusCallback": "https://outbox.example/api/v1/webhooks/sms",
    }


async def test_without_a_public_url_no_status_callback_is_asked_for() -> None:
    recorder = Recorder()
    await send(recorder, api_public_url="http://127.0.0.1:8000")
    assert "StatusCallback" not in recorder.form()


async def test_a_messaging_service_sid_is_sent_instead_of_from() -> None:
    recorder = Recorder()
    await send(recorder, sms_from="MG" + "0" * 32)
    form = recorder.form()
    assert form["MessagingServiceSid"] == "MG" + "0" * 32 and "From" not in form


@pytest.mark.parametrize(
    ("answer", "expected_type", "error_class"),
    [
        (
            twilio_error(400, 21211, "The 'To' number is not a valid phone number."),
            Unreachable,
            "sms_invalid_number",
        ),
        (
            twilio_error(400, 21614, "'To' number is not a valid mobile number"),
            Unreachable,
            "sms_invalid_number",
        ),
        (
            twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
            Unreachable,
            "sms_unsubscribed",
        ),
        (twilio_error(401, 20003, "Authenticate"), ChannelOutage, "sms_auth"),
        (twilio_error(403, 20003, "Permission denied"), ChannelOutage, "sms_auth"),
        (twilio_error(500, 20500, "Internal Server Error"), TransientFailure, "sms_5xx"),
        (httpx.Response(503, text="<html>upstream</html>"), TransientFailure, "sms_5xx"),
        (twilio_error(400, 21602, "Message body is required."), PermanentFailure, "sms_rejected"),
        (
            twilio_error(404, 20404, "The requested resource was not found"),
            PermanentFailure,
            "sms_rejected",
        ),
    ],
)
async def test_twilio_answers_are_classified(
    answer: httpx.Response, expected_type: type, error_class: str
) -> None:
    outcome = await send(Recorder(answer))
    assert isinstance(outcome, expected_type)
    assert outcome.error_class == error_class  # type: ignore[union-attr]
    assert str(answer.status_code) in outcome.error


async def test_an_invalid_number_marks_the_address_and_stop_disables_sms() -> None:
    invalid = await send(Recorder(twilio_error(400, 21211, "invalid")))
    assert invalid.effects == (MarkAddressUndeliverable(channel="sms"),)
    stopped = await send(Recorder(twilio_error(400, 21610, "unsubscribed")))
    assert stopped.effects == (DisableChannel(channel="sms"),)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, 1.0), ("7", 7.0), ("86400", 3600.0), ("soon", 1.0), ("-3", 0.0)],
)
async def test_429_is_a_rate_limit_for_retry_after_seconds(
    header: str | None, seconds: float
) -> None:
    headers = {} if header is None else {"Retry-After": header}
    outcome = await send(Recorder(twilio_error(429, 20429, "Too Many Requests", **headers)))
    assert outcome == RateLimited(retry_after=seconds, error=outcome.error)  # type: ignore[union-attr]


async def test_network_errors_are_transient() -> None:
    for exc in (httpx.ConnectError("refused"), httpx.ReadTimeout("slow")):
        outcome = await send(Recorder(exc))
        assert isinstance(outcome, TransientFailure) and outcome.error_class == "sms_network"


async def test_no_number_or_no_account_falls_back_without_a_request() -> None:
    recorder = Recorder()
    assert isinstance(await send(recorder, sms_envelope(None)), Unreachable)
    outcome = await send(recorder, sms_auth_token=Secret(""))
    assert isinstance(outcome, Unreachable) and outcome.error_class == "not_configured"
    bad = await send(recorder, sms_envelope("0044 7700 900123"))
    assert isinstance(bad, Unreachable) and bad.effects == (
        MarkAddressUndeliverable(channel="sms"),
    )
    assert recorder.requests == []


async def test_other_content_is_a_permanent_failure() -> None:
    outcome = await send(Recorder(), email_envelope())
    assert isinstance(outcome, PermanentFailure) and outcome.error_class == "wrong_content"


async def test_the_auth_token_never_appears_in_an_error() -> None:
    echoed = twilio_error(400, 21602, f"bad request with {TOKEN} in it")
    outcome = await send(Recorder(echoed))
    assert TOKEN not in outcome.error  # type: ignore[union-attr]
    failure = await send(Recorder(httpx.ConnectError(f"could not reach, token={TOKEN}")))
    assert TOKEN not in failure.error  # type: ignore[union-attr]
    assert TOKEN not in repr(settings())
