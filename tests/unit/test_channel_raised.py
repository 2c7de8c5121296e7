"""A channel that raises: the error stored and logged names no token from a URL.

Channels build their error texts with the secrets they know; an exception that
escapes one (a plugin's, a library's) is the last path a secret could take into
``outbox.attempt`` and the log. httpx puts the request URL into its errors, and a
Telegram bot token is a path segment of that URL.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from outbox.dispatcher import delivery
from outbox.dispatcher.channels._redaction import scrub_urls
from outbox.dispatcher.channels.base import Envelope, Outcome, TransientFailure
from tests.unit.test_send_deadlines import envelope

TOKEN = "123456789:AAH-secret-token-value"
URL = f"https://api.telegram.org/bot{TOKEN}/sendMessage?chat_id=42&key=query-secret"


class Raising:
    name = "inapp"

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def send(self, envelope: Envelope) -> Outcome:
        raise self.error

    async def aclose(self) -> None:
        return None


def status_error() -> httpx.HTTPStatusError:
    request = httpx.Request("POST", URL)
    response = httpx.Response(502, request=request)
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as error:
        return error
    raise AssertionError("raise_for_status did not raise")


@pytest.mark.parametrize(
    "error",
    [
        status_error(),
        RuntimeError(f"proxy https://svc:pass-secret@proxy.example:8080/x refused {URL}"),
    ],
    ids=["httpx-status", "userinfo"],
)
async def test_the_error_of_a_raising_channel_keeps_the_host_and_drops_the_rest(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="outbox.dispatcher"):
        attempt = await delivery.send(Raising(error), envelope(), timeout=5)
    outcome = attempt.outcome
    assert isinstance(outcome, TransientFailure) and outcome.error_class == "internal"
    assert type(error).__name__ in outcome.error
    assert "https://api.telegram.org/…" in outcome.error
    logged = caplog.text
    assert "channel raised id=1" in logged and "Traceback" in logged
    for secret in ("AAH-secret-token-value", "query-secret", "pass-secret", "bot123456789"):
        assert secret not in outcome.error, outcome.error
        assert secret not in logged, logged


def test_scrubbing_leaves_text_without_urls_alone() -> None:
    text = "SMTP 550 5.1.1 <u1@example.com>: mailbox unavailable"
    assert scrub_urls(text) == text
    scrubbed = scrub_urls("at http://127.0.0.1:8025 (connect)")
    assert scrubbed == "at http://127.0.0.1:8025/… (connect)"
