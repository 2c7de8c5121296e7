"""PushChannel against a real Web Push service on loopback (no database needed)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels._webpush import VapidSigner, encrypt, load_vapid_key
from outbox.dispatcher.channels.base import (
    DeletePushSubscription,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.dispatcher.channels.push import PushChannel
from outbox.testing.envelopes import push_envelope
from outbox.testing.push import PushServer, PushSubscriber, VapidKeys

PushFactory = Callable[..., PushServer]


def settings_for(keys: VapidKeys, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "vapid_private_key": Secret(keys.private_raw),
        "vapid_public_key": keys.public_raw,
        "vapid_subject": "mailto:ops@outbox.test",
        "push_allowed_hosts": ("127.0.0.1",),
        "push_ttl": 600,
        "push_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def channel_for(
    keys: VapidKeys, *, allow_insecure_http: bool = True, verify: Any = True, **overrides: Any
) -> AsyncIterator[PushChannel]:
    channel = PushChannel(
        settings_for(keys, **overrides),
        transport=httpx.AsyncHTTPTransport(verify=verify),
        allow_insecure_http=allow_insecure_http,
    )
    try:
        yield channel
    finally:
        await channel.aclose()


def assert_no_key(outcome: Outcome, keys: VapidKeys) -> None:
    assert keys.private_raw not in repr(outcome)


async def test_the_service_decrypts_the_exact_payload_and_accepts_the_vapid_token(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe(application_server_key=vapid_keys.public_raw)
    envelope = push_envelope(browser.subscription, topic="price-alert-EURUSD")
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(envelope)

    assert isinstance(outcome, Sent)
    [received] = push_server.messages
    assert received.payload == envelope.content.body  # type: ignore[union-attr]
    assert received.json() == json.loads(envelope.content.body)  # type: ignore[union-attr]
    assert outcome.provider_id is not None and outcome.provider_id.startswith(push_server.url)
    assert received.ttl == 600
    assert received.urgency == "high"
    assert received.topic == "price-alert-EURUSD"
    assert received.headers["content-encoding"] == "aes128gcm"
    assert received.vapid_public_key == vapid_keys.public_raw
    claims = received.vapid_claims
    assert claims["aud"] == push_server.url
    assert claims["sub"] == "mailto:ops@outbox.test"
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600


async def test_campaign_messages_are_sent_with_normal_urgency(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe()
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription, lane="campaign"))

    assert isinstance(outcome, Sent)
    assert push_server.messages[0].urgency == "normal"


async def test_a_pem_vapid_key_signs_the_same_way(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe(application_server_key=vapid_keys.public_raw)
    pem = Secret(vapid_keys.private_pem)
    async with channel_for(vapid_keys, vapid_private_key=pem) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, Sent)


async def test_a_vapid_key_other_than_the_subscription_s_is_rejected_by_the_service(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe(application_server_key=VapidKeys.generate().public_raw)
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "push_auth"
    assert "403" in outcome.error
    assert push_server.messages == []
    assert_no_key(outcome, vapid_keys)


@pytest.mark.parametrize("gone", ["expired", "unknown"])
async def test_a_gone_subscription_is_deleted_and_the_user_is_unreachable(
    push_server: PushServer, vapid_keys: VapidKeys, gone: str
) -> None:
    if gone == "expired":
        browser = push_server.subscribe()
        push_server.expire(browser)
    else:
        browser = PushSubscriber.create(f"{push_server.url}/wpush/never-subscribed")
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "push_gone"
    assert outcome.effects == (DeletePushSubscription(endpoint=browser.endpoint),)


async def test_one_gone_subscription_among_live_ones_is_deleted_and_the_message_sent(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    laptop, phone = push_server.subscribe(), push_server.subscribe()
    push_server.expire(laptop)
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(laptop.subscription, phone.subscription))

    assert isinstance(outcome, Sent)
    assert outcome.effects == (DeletePushSubscription(endpoint=laptop.endpoint),)
    assert [m.endpoint for m in push_server.messages] == [phone.endpoint]


async def test_a_413_is_permanent(push_server: PushServer, vapid_keys: VapidKeys) -> None:
    browser = push_server.subscribe()
    push_server.respond(browser, 413)
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "push_too_large"


@pytest.mark.parametrize(("retry_after", "expected"), [(30, 30.0), (None, 60.0)])
async def test_a_429_waits_for_retry_after_or_a_minute(
    push_server: PushServer, vapid_keys: VapidKeys, retry_after: int | None, expected: float
) -> None:
    browser = push_server.subscribe()
    push_server.respond(browser, 429, retry_after=retry_after)
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, RateLimited)
    assert outcome.retry_after == expected


async def test_a_5xx_is_transient(push_server: PushServer, vapid_keys: VapidKeys) -> None:
    browser = push_server.subscribe()
    push_server.respond(browser, 503)
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, TransientFailure)
    assert outcome.error_class == "push_5xx"


async def test_a_stopped_service_is_a_transient_network_failure(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe()
    push_server.stop()
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, TransientFailure)
    assert outcome.error_class == "push_network"
    assert browser.endpoint.rsplit("/", 1)[1] not in outcome.error


async def test_an_endpoint_on_a_host_outside_the_allowlist_is_never_contacted(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe()
    async with channel_for(vapid_keys, push_allowed_hosts=("fcm.googleapis.com",)) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "push_endpoint_not_allowed"
    assert push_server.requests == []


async def test_an_http_endpoint_is_never_contacted_unless_explicitly_allowed(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe()
    async with channel_for(vapid_keys, allow_insecure_http=False) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "push_endpoint_not_allowed"
    assert push_server.requests == []


async def test_an_https_service_with_a_verified_certificate_needs_no_exception(
    push_server_factory: PushFactory, vapid_keys: VapidKeys
) -> None:
    server = push_server_factory(tls=True)
    browser = server.subscribe(application_server_key=vapid_keys.public_raw)
    async with channel_for(
        vapid_keys, allow_insecure_http=False, verify=server.client_tls_context()
    ) as channel:
        outcome = await channel.send(push_envelope(browser.subscription))

    assert isinstance(outcome, Sent)
    assert server.messages[0].vapid_claims["aud"] == server.url


async def test_a_user_without_subscriptions_is_unreachable(vapid_keys: VapidKeys) -> None:
    async with channel_for(vapid_keys) as channel:
        outcome = await channel.send(push_envelope())

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "no_address"


# --- the service is not a rubber stamp ----------------------------------------------


def post_to(server: PushServer, browser: PushSubscriber, headers: dict[str, str]) -> int:
    body = encrypt(browser.subscription, b'{"title": "x"}')
    base = {"TTL": "60", "Content-Encoding": "aes128gcm"}
    response = httpx.post(browser.endpoint, content=body, headers={**base, **headers})
    return response.status_code


def test_the_service_refuses_tokens_for_another_audience_expired_or_too_long(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser = push_server.subscribe()
    signer = VapidSigner(load_vapid_key(vapid_keys.private_raw), "mailto:ops@outbox.test")

    assert (
        post_to(push_server, browser, {"Authorization": signer.authorization(push_server.url)})
        == 201
    )
    other_audience = signer.authorization("https://fcm.googleapis.com")
    assert post_to(push_server, browser, {"Authorization": other_audience}) == 401
    expired = signer.authorization(push_server.url, now=time.time() - 13 * 3600)
    assert post_to(push_server, browser, {"Authorization": expired}) == 401
    too_long = signer.authorization(push_server.url, now=time.time() + 13 * 3600)
    assert post_to(push_server, browser, {"Authorization": too_long}) == 401
    tampered = signer.authorization(push_server.url).replace("t=", "t=e", 1)
    assert post_to(push_server, browser, {"Authorization": tampered}) == 401
    assert post_to(push_server, browser, {}) == 401
    assert len(push_server.messages) == 1


def test_the_service_refuses_bodies_it_cannot_decrypt_and_missing_ttl(
    push_server: PushServer, vapid_keys: VapidKeys
) -> None:
    browser, stranger = push_server.subscribe(), push_server.subscribe()
    signer = VapidSigner(load_vapid_key(vapid_keys.private_raw), "mailto:ops@outbox.test")
    auth = {"Authorization": signer.authorization(push_server.url)}
    for_stranger = encrypt(stranger.subscription, b"{}")

    response = httpx.post(
        browser.endpoint,
        content=for_stranger,
        headers={**auth, "TTL": "60", "Content-Encoding": "aes128gcm"},
    )
    assert response.status_code == 400
    assert post_to(push_server, browser, {**auth, "TTL": ""}) == 400
    assert post_to(push_server, browser, {**auth, "Urgency": "urgent"}) == 400
    assert push_server.messages == []
