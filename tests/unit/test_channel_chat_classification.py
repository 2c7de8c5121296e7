"""The example plugin channel (outbox.testing.chat) classifies every answer."""

from __future__ import annotations

from typing import Any, cast

import httpx
import pytest

from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableChannel,
    Envelope,
    MarkAddressUndeliverable,
    PermanentFailure,
    RateLimited,
    Recipient,
    RenderedText,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.testing.chat import ChatChannel

ENV = {"OUTBOX_CHAT_URL": "https://chat.example", "OUTBOX_CHAT_TOKEN": "s3cret"}


def envelope(handle: str | None = "@u1") -> Envelope:
    return Envelope(
        message_id=1,
        lane="transactional",
        channel=cast(Any, "chat"),
        user_id="u1",
        template="price_alert",
        attempt=1,
        recipient=Recipient(user_id="u1", addresses={"chat": handle} if handle else {}),
        content=RenderedText(text="EURUSD crossed 1.0850"),
    )


@pytest.mark.parametrize(
    ("status", "body", "kind", "error_class", "effects"),
    [
        (200, {"id": "msg-7"}, Sent, None, ()),
        (429, {}, RateLimited, None, ()),
        (503, {}, TransientFailure, "chat_5xx", ()),
        (404, {}, Unreachable, "chat_unknown_handle", (MarkAddressUndeliverable(channel="chat"),)),
        (403, {}, Unreachable, "chat_muted", (DisableChannel(channel="chat"),)),
        (401, {}, ChannelOutage, "chat_auth", ()),
        (400, {}, PermanentFailure, "chat_4xx", ()),
    ],
)
async def test_every_answer_is_an_outcome(
    status: int, body: dict[str, str], kind: type, error_class: str | None, effects: tuple
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body, headers={"Retry-After": "3"})

    channel = ChatChannel(ENV, transport=httpx.MockTransport(answer))
    outcome = await channel.send(envelope())
    await channel.aclose()
    assert type(outcome) is kind
    assert getattr(outcome, "error_class", None) == error_class
    assert outcome.effects == effects
    if isinstance(outcome, Sent):
        assert outcome.provider_id == "msg-7"
    if isinstance(outcome, RateLimited):
        assert outcome.retry_after == 3.0
    [request] = seen
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.url == "https://chat.example/messages"
    assert "s3cret" not in str(outcome)


async def test_no_handle_is_unreachable_without_a_request() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    channel = ChatChannel(ENV, transport=httpx.MockTransport(refuse))
    outcome = await channel.send(envelope(None))
    await channel.aclose()
    assert isinstance(outcome, Unreachable) and outcome.error_class == "no_address"


async def test_a_network_error_is_transient() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    channel = ChatChannel(ENV, transport=httpx.MockTransport(down))
    outcome = await channel.send(envelope())
    await channel.aclose()
    assert isinstance(outcome, TransientFailure) and outcome.error_class == "chat_network"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OUTBOX_CHAT_URL": "http://chat.example", "OUTBOX_CHAT_TOKEN": "t"},
        {"OUTBOX_CHAT_URL": "https://chat.example"},
    ],
)
def test_the_plugin_refuses_a_plain_http_url_or_no_token(env: dict[str, str]) -> None:
    from outbox import ConfigurationError

    with pytest.raises(ConfigurationError):
        ChatChannel(env)
