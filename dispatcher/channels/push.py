"""Web Push with VAPID (RFC 8030/8291/8292) to every subscription of the user.

Each subscription gets its own request: a fresh VAPID token for the endpoint's
origin, the payload encrypted for that browser (``aes128gcm``, via pywebpush), and
the headers ``TTL`` (``settings.push_ttl``), ``Urgency`` (``high`` for the
transactional lane, ``normal`` for campaigns) and ``Topic`` (so a newer alert
replaces an undelivered older one). Requests go through one httpx client with an
explicit timeout and never follow redirects; an endpoint that fails
:func:`~outbox.dispatcher.channels._webpush.endpoint_refusal` (not ``https``, host not in
``OUTBOX_PUSH_ALLOWED_HOSTS``) is never contacted.

One subscription's answer:

=================  ===============================================================
2xx                accepted
404, 410           gone: :class:`DeletePushSubscription` for that endpoint
413                ``push_too_large``        (permanent)
429                rate limited for ``Retry-After`` seconds (60 when absent)
401, 403           ``push_auth``             (permanent: the VAPID key was refused)
other 4xx          ``push_rejected``         (permanent)
5xx                ``push_5xx``              (transient)
network, timeout   ``push_network``          (transient)
=================  ===============================================================

The message's outcome, from the first rule that applies:

1. some subscription accepted: ``Sent`` (effects: the gone subscriptions deleted);
2. some were rate limited: ``RateLimited`` for the longest wait;
3. some failed transiently: ``TransientFailure``;
4. some were gone: ``Unreachable("push_gone")``, so the message falls back;
5. some failed permanently: ``PermanentFailure`` with that error class;
6. none could be contacted: ``Unreachable("push_endpoint_not_allowed")``: the user has
   no push address this service may call, so the message falls back to the next
   channel (and is dead with that error class when there is none); the attempt log
   keeps the refusal for the operator.

A user with no subscriptions is ``Unreachable("no_address")``; without a VAPID key
configured every send is ``Unreachable("not_configured")``. A malformed key raises
:class:`~outbox._errors.ConfigurationError` at construction. Retries send to every
subscription again (a browser that already got the message shows it once more,
unless the ``Topic`` lets the push service replace it). Error texts name the
endpoint's host only: the endpoint path is a capability and is not logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import httpx

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels._redaction import describe_error, redact
from outbox.dispatcher.channels._webpush import (
    VapidSigner,
    encrypt,
    endpoint_refusal,
    keys_refusal,
    load_vapid_key,
    origin,
    public_key_b64,
    topic_header,
)
from outbox.dispatcher.channels.base import (
    DeletePushSubscription,
    Effect,
    Envelope,
    Outcome,
    PermanentFailure,
    PushSubscription,
    RateLimited,
    RenderedPush,
    Sent,
    TransientFailure,
    Unreachable,
)

logger = logging.getLogger(__name__)

MAX_PAYLOAD = 3993
DEFAULT_RETRY_AFTER = 60.0

Kind = Literal["accepted", "gone", "rate_limited", "transient", "permanent", "refused"]


def subscription_refusal(settings: Settings, endpoint: str, p256dh: str, auth: str) -> str | None:
    """Why this channel would never deliver to a browser subscription, or None.

    The rules it applies before every send, for whoever stores subscriptions (the
    API checks a browser's before storing it): an ``https`` endpoint on a host in
    ``OUTBOX_PUSH_ALLOWED_HOSTS`` without user info, keys that can encrypt.
    """
    allowed = tuple(h.strip().lower() for h in settings.push_allowed_hosts if h.strip())
    return endpoint_refusal(endpoint, allowed) or keys_refusal(p256dh, auth)


def application_server_key(settings: Settings) -> str | None:
    """The VAPID public key browsers subscribe with (base64url, unpadded), derived
    from ``OUTBOX_VAPID_PRIVATE_KEY``; None when push is not configured. Raises
    :class:`~outbox._errors.ConfigurationError` for a key that is not P-256.
    """
    secret = settings.vapid_private_key
    if not secret:
        return None
    return public_key_b64(load_vapid_key(secret.reveal()))


@dataclass(frozen=True)
class _Result:
    kind: Kind
    error_class: str = ""
    error: str = ""
    retry_after: float = 0.0
    location: str | None = None


def _retry_after(value: str | None) -> float:
    if not value:
        return DEFAULT_RETRY_AFTER
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    return max(moment.timestamp() - time.time(), 0.0)


class PushChannel:
    """Sends :class:`RenderedPush` payloads to all of a user's subscriptions.

    ``transport`` replaces httpx's network transport (``httpx.MockTransport`` in unit
    tests, or one that trusts a test certificate). ``allow_insecure_http`` lets
    ``http://`` endpoints through when their host is listed exactly in the allowlist;
    it exists for loopback tests and the demo and must stay off in production.
    """

    name: str = "push"

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        self._settings = settings
        self._allowed = tuple(h.strip().lower() for h in settings.push_allowed_hosts if h.strip())
        self._allow_http = allow_insecure_http
        self._signer: VapidSigner | None = None
        secret = settings.vapid_private_key
        if not secret:
            logger.warning("OUTBOX_VAPID_PRIVATE_KEY is not set: push messages fall back")
        else:
            key = load_vapid_key(secret.reveal())
            public = public_key_b64(key)
            if settings.vapid_public_key and settings.vapid_public_key.rstrip("=") != public:
                raise ConfigurationError(
                    "OUTBOX_VAPID_PUBLIC_KEY does not belong to OUTBOX_VAPID_PRIVATE_KEY"
                )
            self._signer = VapidSigner(key, settings.vapid_subject)
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(settings.push_timeout),
            follow_redirects=False,
            headers={"User-Agent": "outbox-dispatcher"},
        )

    async def send(self, envelope: Envelope) -> Outcome:
        """Fan out to every subscription; see the module docstring for the outcome."""
        content = envelope.content
        if not isinstance(content, RenderedPush):
            return PermanentFailure(
                error_class="wrong_content", error=f"push cannot send {type(content).__name__}"
            )
        if self._signer is None:
            return Unreachable(error_class="not_configured", error="no VAPID key is set")
        subscriptions = envelope.recipient.push_subscriptions
        if not subscriptions:
            return Unreachable(error_class="no_address", error="the user has no push subscription")
        if len(content.body) > MAX_PAYLOAD:
            return PermanentFailure(
                error_class="push_too_large",
                error=f"payload is {len(content.body)} bytes; at most {MAX_PAYLOAD} fit",
            )
        results = await asyncio.gather(
            *(self._deliver(envelope, content, sub) for sub in subscriptions)
        )
        return self._combine(list(zip(subscriptions, results, strict=True)))

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    # --- internals -----------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        key = self._settings.vapid_private_key
        return (key.reveal(),) if key else ()

    async def _deliver(
        self, envelope: Envelope, content: RenderedPush, subscription: PushSubscription
    ) -> _Result:
        assert self._signer is not None
        endpoint = subscription.endpoint
        refusal = endpoint_refusal(endpoint, self._allowed, allow_insecure_http=self._allow_http)
        if refusal is not None:
            logger.warning("push endpoint refused without a request: %s", refusal)
            return _Result("refused", "push_endpoint_not_allowed", refusal)
        host = urlsplit(endpoint).hostname or "?"
        try:
            body = encrypt(subscription, content.body)
        except ValueError as exc:
            return _Result("permanent", "push_invalid_subscription", f"{host}: {exc}")
        headers = {
            "Authorization": self._signer.authorization(origin(endpoint)),
            "TTL": str(self._settings.push_ttl),
            "Urgency": "high" if envelope.lane == "transactional" else "normal",
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        topic = topic_header(content.topic)
        if topic is not None:
            headers["Topic"] = topic
        try:
            response = await self._client.post(endpoint, content=body, headers=headers)
        except httpx.HTTPError as exc:
            error = describe_error(exc, self._secrets())
            return _Result("transient", "push_network", f"{host}: {error}")
        return self._classify(host, response)

    def _classify(self, host: str, response: httpx.Response) -> _Result:
        status = response.status_code
        detail = response.text[:200].strip() or response.reason_phrase
        error = redact(f"{host}: {status} {detail}", self._secrets())
        if 200 <= status < 300:
            return _Result("accepted", location=response.headers.get("Location"))
        if status in (404, 410):
            return _Result("gone", "push_gone", error)
        if status == 413:
            return _Result("permanent", "push_too_large", error)
        if status == 429:
            wait = _retry_after(response.headers.get("Retry-After"))
            return _Result("rate_limited", "push_rate_limited", error, retry_after=wait)
        if status in (401, 403):
            return _Result("permanent", "push_auth", error)
        if status >= 500:
            return _Result("transient", "push_5xx", error)
        return _Result("permanent", "push_rejected", error)

    @staticmethod
    def _combine(results: list[tuple[PushSubscription, _Result]]) -> Outcome:
        effects: tuple[Effect, ...] = tuple(
            DeletePushSubscription(endpoint=sub.endpoint)
            for sub, result in results
            if result.kind == "gone"
        )
        by_kind: dict[Kind, list[_Result]] = {}
        for _, result in results:
            by_kind.setdefault(result.kind, []).append(result)
        if accepted := by_kind.get("accepted"):
            return Sent(provider_id=accepted[0].location, effects=effects)
        if limited := by_kind.get("rate_limited"):
            worst = max(limited, key=lambda r: r.retry_after)
            return RateLimited(retry_after=worst.retry_after, error=worst.error, effects=effects)
        summary = "; ".join(result.error for _, result in results)
        if transient := by_kind.get("transient"):
            return TransientFailure(
                error_class=transient[0].error_class, error=summary, effects=effects
            )
        if "gone" in by_kind:
            return Unreachable(error_class="push_gone", error=summary, effects=effects)
        if permanent := by_kind.get("permanent"):
            return PermanentFailure(error_class=permanent[0].error_class, error=summary)
        return Unreachable(error_class="push_endpoint_not_allowed", error=summary, effects=effects)
