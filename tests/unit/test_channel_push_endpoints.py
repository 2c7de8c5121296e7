"""PushChannel without a service: allowlist, VAPID keys, headers, classification."""

from __future__ import annotations

import base64
import email.utils
import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from outbox._errors import ConfigurationError
from outbox._settings import DEFAULT_PUSH_ALLOWED_HOSTS, Secret, Settings
from outbox.dispatcher.channels._webpush import (
    VapidSigner,
    endpoint_refusal,
    host_matches,
    load_vapid_key,
    public_key_b64,
    topic_header,
)
from outbox.dispatcher.channels.base import (
    DeletePushSubscription,
    PermanentFailure,
    PushSubscription,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.dispatcher.channels.push import PushChannel
from outbox.testing.envelopes import push_envelope
from outbox.testing.push import PushSubscriber, VapidKeys

KEYS = VapidKeys.generate()


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("fcm.googleapis.com", "fcm.googleapis.com", True),
        ("updates.push.services.mozilla.com", "*.push.services.mozilla.com", True),
        ("a.b.push.services.mozilla.com", "*.push.services.mozilla.com", True),
        ("push.services.mozilla.com", "*.push.services.mozilla.com", False),
        ("evilpush.services.mozilla.com", "*.push.services.mozilla.com", False),
        ("fcm.googleapis.com.evil.example", "fcm.googleapis.com", False),
        ("wns2-par02p.notify.windows.com", "*.NOTIFY.windows.com", True),
    ],
)
def test_host_patterns_match_exact_names_and_subdomains_only(
    host: str, pattern: str, matches: bool
) -> None:
    assert host_matches(host, pattern) is matches


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://fcm.googleapis.com/fcm/send/abc",
        "https://FCM.googleapis.com./fcm/send/abc",
        "https://updates.push.services.mozilla.com/wpush/v2/abc",
        "https://web.push.apple.com/QGuQ",
    ],
)
def test_endpoints_of_known_push_services_are_allowed(endpoint: str) -> None:
    assert endpoint_refusal(endpoint, DEFAULT_PUSH_ALLOWED_HOSTS) is None


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/admin",
        "https://fcm.googleapis.com@10.0.0.1/x",
        "https://user:pw@fcm.googleapis.com/x",
        "http://fcm.googleapis.com/fcm/send/abc",
        "ftp://fcm.googleapis.com/x",
        "https://fcm.googleapis.com:99999/x",
        "https://[::1]/x",
        "https://fcm.googleapis.com%2f.evil.example/x",
        "//fcm.googleapis.com/x",
        "not a url",
    ],
)
def test_other_endpoints_are_refused(endpoint: str) -> None:
    assert endpoint_refusal(endpoint, DEFAULT_PUSH_ALLOWED_HOSTS) is not None


def test_http_needs_the_flag_and_an_exactly_listed_host() -> None:
    allowed = ("127.0.0.1", "*.test")
    assert endpoint_refusal("http://127.0.0.1:8080/p", allowed) is not None
    assert endpoint_refusal("http://127.0.0.1:8080/p", allowed, allow_insecure_http=True) is None
    assert endpoint_refusal("http://a.test/p", allowed, allow_insecure_http=True) is not None


def test_a_vapid_key_is_read_from_raw_pem_or_der() -> None:
    der = serialization.load_pem_private_key(KEYS.private_pem.encode(), None).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    for text in (KEYS.private_raw, KEYS.private_pem, base64.b64encode(der).decode()):
        assert public_key_b64(load_vapid_key(text)) == KEYS.public_raw


@pytest.mark.parametrize("text", ["not a key", "AAAA", "-----BEGIN PRIVATE KEY-----\nxx\n"])
def test_a_malformed_vapid_key_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigurationError):
        load_vapid_key(text)


def test_a_vapid_key_on_another_curve_is_a_configuration_error() -> None:
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ConfigurationError, match="P-256"):
        load_vapid_key(pem)


def test_the_vapid_token_has_fresh_claims_for_the_endpoint_origin() -> None:
    signer = VapidSigner(load_vapid_key(KEYS.private_raw), "mailto:ops@outbox.test")
    header = signer.authorization("https://fcm.googleapis.com")
    token = header.split("t=")[1].split(",")[0]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))

    assert header.startswith("vapid t=")
    assert header.endswith(f"k={KEYS.public_raw}")
    assert claims["aud"] == "https://fcm.googleapis.com"
    assert claims["sub"] == "mailto:ops@outbox.test"
    assert time.time() + 11 * 3600 < claims["exp"] < time.time() + 24 * 3600


def test_a_public_key_that_does_not_match_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="PUBLIC_KEY"):
        PushChannel(settings(vapid_public_key=VapidKeys.generate().public_raw))


def test_a_subject_that_is_not_a_uri_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SUBJECT"):
        PushChannel(settings(vapid_subject="ops team"))


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (None, None),
        ("price-alert_EURUSD", "price-alert_EURUSD"),
        ("a" * 32, "a" * 32),
    ],
)
def test_valid_topics_pass_unchanged(topic: str | None, expected: str | None) -> None:
    assert topic_header(topic) == expected


def test_an_invalid_topic_becomes_a_stable_valid_digest() -> None:
    digest = topic_header("price alert: EUR/USD above 1.1 (and more than 32 chars)")

    assert digest is not None and len(digest) == 32
    assert digest == topic_header("price alert: EUR/USD above 1.1 (and more than 32 chars)")
    assert topic_header(digest) == digest


# --- the channel with a mock service ----------------------------------------------


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "vapid_private_key": Secret(KEYS.private_raw),
        "vapid_public_key": KEYS.public_raw,
        "vapid_subject": "mailto:ops@outbox.test",
        "push_allowed_hosts": ("push.example.com",),
        "push_ttl": 120,
    }
    values.update(overrides)
    return Settings(**values)


def subscription(name: str = "a") -> PushSubscription:
    return PushSubscriber.create(f"https://push.example.com/sub/{name}").subscription


class Service:
    """MockTransport handler answering per endpoint path."""

    def __init__(self, **answers: httpx.Response | Exception) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.get(request.url.path.rsplit("/", 1)[1])
        if isinstance(answer, Exception):
            raise answer
        return answer or httpx.Response(201, headers={"Location": "https://push.example.com/m/1"})


async def send(service: Service, *subs: PushSubscription, **envelope: Any) -> Any:
    channel = PushChannel(settings(), transport=httpx.MockTransport(service))
    try:
        return await channel.send(push_envelope(*subs, **envelope))
    finally:
        await channel.aclose()


async def test_the_request_carries_ttl_urgency_topic_and_an_encrypted_body() -> None:
    service = Service()
    outcome = await send(service, subscription(), topic="bad topic with spaces")

    assert outcome == Sent(provider_id="https://push.example.com/m/1")
    [request] = service.requests
    assert request.headers["TTL"] == "120"
    assert request.headers["Urgency"] == "high"
    assert request.headers["Topic"] == topic_header("bad topic with spaces")
    assert request.headers["Content-Encoding"] == "aes128gcm"
    assert request.headers["Authorization"].startswith("vapid t=")
    assert b"EURUSD" not in request.content


@pytest.mark.parametrize(
    ("answer", "kind", "error_class"),
    [
        (httpx.Response(404), Unreachable, "push_gone"),
        (httpx.Response(410), Unreachable, "push_gone"),
        (httpx.Response(413), PermanentFailure, "push_too_large"),
        (httpx.Response(401), PermanentFailure, "push_auth"),
        (httpx.Response(403), PermanentFailure, "push_auth"),
        (httpx.Response(400), PermanentFailure, "push_rejected"),
        (httpx.Response(500), TransientFailure, "push_5xx"),
        (httpx.ConnectError("refused"), TransientFailure, "push_network"),
        (httpx.ReadTimeout("slow"), TransientFailure, "push_network"),
    ],
)
async def test_one_subscription_s_answer_is_classified(
    answer: httpx.Response | Exception, kind: type, error_class: str
) -> None:
    outcome = await send(Service(a=answer), subscription("a"))

    assert isinstance(outcome, kind)
    assert outcome.error_class == error_class  # type: ignore[union-attr]
    assert "/sub/a" not in outcome.error  # type: ignore[union-attr]


async def test_retry_after_may_be_an_http_date() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    outcome = await send(
        Service(a=httpx.Response(429, headers={"Retry-After": later})), subscription("a")
    )

    assert isinstance(outcome, RateLimited)
    assert 100 < outcome.retry_after <= 120


async def test_a_rate_limit_outranks_a_gone_subscription_which_is_still_deleted() -> None:
    gone, limited = subscription("gone"), subscription("busy")
    service = Service(gone=httpx.Response(410), busy=httpx.Response(429))

    outcome = await send(service, gone, limited)

    assert isinstance(outcome, RateLimited)
    assert outcome.effects == (DeletePushSubscription(endpoint=gone.endpoint),)


async def test_a_transient_failure_outranks_a_gone_subscription() -> None:
    gone, down = subscription("gone"), subscription("down")

    outcome = await send(Service(gone=httpx.Response(404), down=httpx.Response(502)), gone, down)

    assert isinstance(outcome, TransientFailure)
    assert outcome.effects == (DeletePushSubscription(endpoint=gone.endpoint),)


async def test_a_disallowed_endpoint_is_skipped_and_the_allowed_one_served() -> None:
    evil = PushSubscriber.create("https://169.254.169.254/latest").subscription
    service = Service()

    outcome = await send(service, evil, subscription("a"))

    assert isinstance(outcome, Sent)
    assert [request.url.host for request in service.requests] == ["push.example.com"]


async def test_a_payload_over_3993_bytes_is_refused_without_a_request() -> None:
    service = Service()
    outcome = await send(service, subscription(), payload={"body": "x" * 4000})

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "push_too_large"
    assert service.requests == []


async def test_a_subscription_with_malformed_keys_is_permanent_without_a_request() -> None:
    broken = PushSubscription(endpoint="https://push.example.com/x", p256dh="AAAA", auth="BBBB")
    service = Service()

    outcome = await send(service, broken)

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "push_invalid_subscription"
    assert service.requests == []


async def test_without_a_vapid_key_every_message_falls_back() -> None:
    service = Service()
    channel = PushChannel(
        settings(vapid_private_key=Secret(""), vapid_public_key=""),
        transport=httpx.MockTransport(service),
    )
    outcome = await channel.send(push_envelope(subscription()))
    await channel.aclose()

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "not_configured"
    assert service.requests == []


async def test_the_private_key_never_appears_in_an_error() -> None:
    leak = httpx.Response(400, text=f"your key {KEYS.private_raw} is odd")

    outcome = await send(Service(a=leak), subscription("a"))

    assert KEYS.private_raw not in outcome.error
