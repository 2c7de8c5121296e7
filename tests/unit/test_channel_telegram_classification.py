"""TelegramChannel with httpx.MockTransport: classification, parts, token hygiene."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableTelegram,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
    UpdateTelegramChat,
)
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.envelopes import email_envelope, telegram_envelope

TOKEN = "555000111:AAF-unit-token_zyxwvutsrqponmlkjihgf"
Handler = Callable[[httpx.Request], httpx.Response]


def ok(message_id: int = 1) -> httpx.Response:
    return httpx.Response(200, json={"ok": True, "result": {"message_id": message_id}})


def error(status: int, description: str, **parameters: Any) -> httpx.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return httpx.Response(status, json=body)


class Recorder:
    """A MockTransport handler that answers from a script and records requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else ok(len(self.requests))
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(request.content) for request in self.requests]


def make_channel(handler: Handler, token: str = TOKEN) -> TelegramChannel:
    settings = Settings(
        telegram_bot_token=Secret(token), telegram_api_url="https://api.telegram.test"
    )
    return TelegramChannel(settings, transport=httpx.MockTransport(handler))


async def send_one(*answers: httpx.Response | Exception) -> Outcome:
    recorder = Recorder(*answers)
    channel = make_channel(recorder)
    try:
        return await channel.send(telegram_envelope(77))
    finally:
        await channel.aclose()


async def test_the_request_is_a_markdown_v2_send_message_with_the_real_token() -> None:
    recorder = Recorder()
    channel = make_channel(recorder)
    outcome = await channel.send(telegram_envelope(77, "*hi*"))
    await channel.aclose()

    assert outcome == Sent(provider_id="1")
    [request] = recorder.requests
    assert request.method == "POST"
    assert request.url.path == f"/bot{TOKEN}/sendMessage"
    assert recorder.bodies[0]["chat_id"] == 77
    assert recorder.bodies[0]["text"] == "*hi*"
    assert recorder.bodies[0]["parse_mode"] == "MarkdownV2"


@pytest.mark.parametrize(
    ("answer", "kind", "error_class"),
    [
        (error(400, "Bad Request: chat not found"), PermanentFailure, "telegram_chat_not_found"),
        (error(400, "Bad Request: can't parse entities"), PermanentFailure, "telegram_bad_request"),
        (error(400, "Bad Request: message is too long"), PermanentFailure, "telegram_bad_request"),
        (error(403, "Forbidden: bot was blocked by the user"), Unreachable, "telegram_blocked"),
        (error(403, "Forbidden: bot can't initiate conversation"), Unreachable, "telegram_blocked"),
        (error(401, "Unauthorized"), ChannelOutage, "telegram_auth"),
        (error(404, "Not Found"), ChannelOutage, "telegram_auth"),
        (error(500, "Internal Server Error"), TransientFailure, "telegram_5xx"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), TransientFailure, "telegram_5xx"),
        (httpx.ConnectError("connection refused"), ChannelOutage, "telegram_connect"),
        (httpx.ConnectTimeout("connect timed out"), ChannelOutage, "telegram_connect"),
        (httpx.ReadTimeout("read timed out"), TransientFailure, "telegram_network"),
        (httpx.RemoteProtocolError("peer closed"), TransientFailure, "telegram_network"),
    ],
)
async def test_answers_are_classified(
    answer: httpx.Response | Exception, kind: type, error_class: str
) -> None:
    outcome = await send_one(answer)

    assert isinstance(outcome, kind)
    assert outcome.error_class == error_class  # type: ignore[union-attr]


async def test_blocked_carries_the_disable_effect() -> None:
    outcome = await send_one(error(403, "Forbidden: bot was blocked by the user"))

    assert outcome.effects == (DisableTelegram(),)


@pytest.mark.parametrize(
    ("answer", "seconds"),
    [
        (error(429, "Too Many Requests: retry after 7", retry_after=7), 7.0),
        (httpx.Response(429, headers={"Retry-After": "3"}, json={"ok": False}), 3.0),
        (httpx.Response(429, text="slow down"), 1.0),
    ],
)
async def test_a_429_waits_for_what_telegram_asks(answer: httpx.Response, seconds: float) -> None:
    outcome = await send_one(answer)

    assert isinstance(outcome, RateLimited)
    assert outcome.retry_after == seconds


async def test_a_migration_resends_to_the_new_chat_at_once() -> None:
    recorder = Recorder(
        error(400, "Bad Request: group chat was upgraded", migrate_to_chat_id=-1009)
    )
    channel = make_channel(recorder)
    outcome = await channel.send(telegram_envelope(-9))
    await channel.aclose()

    assert isinstance(outcome, Sent)
    assert outcome.effects == (UpdateTelegramChat(chat_id=-1009),)
    assert [body["chat_id"] for body in recorder.bodies] == [-9, -1009]


async def test_a_failure_after_migrating_still_carries_the_new_chat() -> None:
    outcome = await send_one(
        error(400, "Bad Request: group chat was upgraded", migrate_to_chat_id=-1009),
        error(429, "Too Many Requests: retry after 5", retry_after=5),
    )

    assert isinstance(outcome, RateLimited)
    assert outcome.effects == (UpdateTelegramChat(chat_id=-1009),)


async def test_a_chat_that_migrates_twice_is_a_permanent_failure() -> None:
    outcome = await send_one(
        error(400, "upgraded", migrate_to_chat_id=-1),
        error(400, "upgraded", migrate_to_chat_id=-2),
    )

    assert isinstance(outcome, PermanentFailure)


async def test_a_retry_skips_parts_already_delivered_by_this_process() -> None:
    recorder = Recorder(ok(1), error(429, "Too Many Requests", retry_after=1))
    channel = make_channel(recorder)
    envelope = telegram_envelope(77, "one", "two", "three")
    first = await channel.send(envelope)
    second = await channel.send(envelope)
    third = await channel.send(envelope)
    await channel.aclose()

    assert isinstance(first, RateLimited)
    assert "after 1 of 3 parts" in first.error
    assert isinstance(second, Sent)
    assert isinstance(third, Sent), "once delivered, a new send of it starts over"
    assert [body["text"] for body in recorder.bodies] == [
        *("one", "two"),  # the first send, stopped by the 429
        *("two", "three"),  # the retry
        *("one", "two", "three"),  # the third send
    ]


async def test_a_permanent_failure_forgets_the_progress() -> None:
    recorder = Recorder(ok(1), error(400, "Bad Request: can't parse entities"))
    channel = make_channel(recorder)
    envelope = telegram_envelope(77, "one", "two")
    assert isinstance(await channel.send(envelope), PermanentFailure)
    assert isinstance(await channel.send(envelope), Sent)
    await channel.aclose()

    assert [body["text"] for body in recorder.bodies] == ["one", "two", "one", "two"]


async def test_the_token_is_scrubbed_from_errors_that_contain_the_url() -> None:
    def leaky(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError(f"failed reading {request.url}")

    channel = make_channel(leaky)
    outcome = await channel.send(telegram_envelope(77))
    await channel.aclose()

    assert isinstance(outcome, TransientFailure)
    assert TOKEN not in outcome.error
    assert "api.telegram.test" in outcome.error


async def test_the_token_is_scrubbed_from_descriptions() -> None:
    outcome = await send_one(error(400, f"Bad Request: token {TOKEN} is odd"))

    assert isinstance(outcome, PermanentFailure)
    assert TOKEN not in outcome.error


async def test_client_side_objects_only_ever_see_the_placeholder() -> None:
    seen: list[httpx.Response] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response)

    channel = make_channel(Recorder())
    channel._client.event_hooks["response"].append(hook)
    await channel.send(telegram_envelope(77))
    await channel.aclose()

    assert seen[0].request.url.path == "/botREDACTED/sendMessage"


async def test_content_for_another_channel_is_a_permanent_failure() -> None:
    channel = make_channel(Recorder())
    outcome = await channel.send(email_envelope())
    await channel.aclose()

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "wrong_content"
