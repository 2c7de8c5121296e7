"""Telegram Bot API ``sendMessage`` with MarkdownV2, over one shared httpx client.

What ``send`` answers (it never raises for provider errors):

================================================  =====================================
no bot token configured                           ``Unreachable("not_configured")``
recipient has no chat id                          ``Unreachable("no_address")``
200 ``ok``                                        ``Sent`` (provider id: message ids)
429, ``parameters.retry_after``                   ``RateLimited(retry_after)``
400 with ``parameters.migrate_to_chat_id``        resent at once to the new chat; the
                                                  outcome carries ``UpdateTelegramChat``
400 ``chat not found``                            ``PermanentFailure(
                                                  "telegram_chat_not_found")``
any other 400 (e.g. can't parse entities)         ``PermanentFailure(
                                                  "telegram_bad_request")``
403 (blocked, kicked, cannot initiate)            ``Unreachable("telegram_blocked")``
                                                  with ``DisableTelegram``
401 or 404 (the token is wrong)                   ``ChannelOutage("telegram_auth")``
cannot connect (refused, DNS, TLS, timeout)       ``ChannelOutage("telegram_connect")``
timeout or network error after connecting         ``TransientFailure("telegram_network")``
5xx                                               ``TransientFailure("telegram_5xx")``
================================================  =====================================

Long texts arrive already split (``RenderedTelegram.parts``) and are sent in order,
each request at its own rate-limit slot (``Envelope.send_slots``: the bot's and the
chat's limits hold per part, not per message).
When a later part fails with something worth retrying, the channel remembers (in
this process, keyed by message id and chat) how many parts were delivered, and the
retry continues from the first undelivered part. A retry picked up by another
dispatcher replica does not have that memory and sends every part again; a timeout
after Telegram received a part can also duplicate it. Both are the at-least-once
duplicates the design accepts.

The bot token never leaves this module except on the wire: the client's URLs carry a
placeholder that a private transport replaces just before the request is sent, so
httpx's own request log, response objects and exceptions show ``/botREDACTED/``;
error texts are additionally scrubbed.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.request
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import httpx

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels._redaction import describe_error, redact
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableTelegram,
    Effect,
    Envelope,
    Outcome,
    PermanentFailure,
    RateLimited,
    RenderedTelegram,
    Sent,
    TransientFailure,
    Unreachable,
    UpdateTelegramChat,
    wait_for_slot,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
_PLACEHOLDER = b"REDACTED"
_REMEMBERED_MESSAGES = 10_000


class _TokenTransport(httpx.AsyncBaseTransport):
    """Put the real token into ``/botREDACTED/`` at the last moment."""

    def __init__(self, inner: httpx.AsyncBaseTransport, token: Secret) -> None:
        self._inner = inner
        self._token = token

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        marker = b"/bot" + _PLACEHOLDER + b"/"
        path = request.url.raw_path.replace(marker, b"/bot" + self._token.reveal().encode() + b"/")
        real = httpx.Request(
            request.method,
            request.url.copy_with(raw_path=path),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(real)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclasses.dataclass(frozen=True)
class _Delivered:
    message_id: int


@dataclasses.dataclass(frozen=True)
class _Migrated:
    chat_id: int


def _network_transport(api_url: str) -> httpx.AsyncHTTPTransport:
    """Build the network transport, honouring ``HTTPS_PROXY``/``NO_PROXY`` as httpx does.

    httpx reads proxy variables only for transports it creates itself; this one is
    created here because it is wrapped by :class:`_TokenTransport`.
    """
    parts = urlsplit(api_url)
    proxy = None
    if not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = urllib.request.getproxies().get(parts.scheme)
    return httpx.AsyncHTTPTransport(proxy=proxy)


def _with_effects(outcome: Outcome, effects: list[Effect]) -> Outcome:
    if not effects:
        return outcome
    return dataclasses.replace(outcome, effects=(*outcome.effects, *effects))


class TelegramChannel:
    """Sends :class:`RenderedTelegram` parts with ``parse_mode=MarkdownV2``.

    Without a bot token every send answers ``Unreachable("not_configured")``, so
    messages fall back to the user's other channels. ``transport`` replaces httpx's
    network transport (``httpx.MockTransport`` in unit tests, a transport trusting a
    test certificate); ``timeout`` bounds every request.
    """

    name: str = "telegram"

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._configured = bool(settings.telegram_bot_token)
        if not self._configured:
            logger.warning("OUTBOX_TELEGRAM_BOT_TOKEN is not set: Telegram messages fall back")
        self._token = settings.telegram_bot_token
        api_url = settings.telegram_api_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=f"{api_url}/bot{_PLACEHOLDER.decode()}/",
            transport=_TokenTransport(transport or _network_transport(api_url), self._token),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=False,
            headers={"User-Agent": "outbox-dispatcher"},
        )
        # (message id, chat id) -> parts already delivered, for retries in this process.
        self._progress: OrderedDict[tuple[int, int], int] = OrderedDict()

    async def send(self, envelope: Envelope) -> Outcome:
        """Send every part in order; see the module docstring for the classification."""
        content = envelope.content
        if not isinstance(content, RenderedTelegram):
            return PermanentFailure(
                error_class="wrong_content", error=f"telegram cannot send {type(content).__name__}"
            )
        if not self._configured:
            return Unreachable(error_class="not_configured", error="no Telegram bot token is set")
        chat_id = envelope.recipient.telegram_chat_id
        if chat_id is None:
            return Unreachable(error_class="no_address", error="the user has no Telegram chat")
        if not content.parts:
            return PermanentFailure(error_class="telegram_bad_request", error="no text to send")
        effects: list[Effect] = []
        delivered: list[str] = []
        index = self._progress.get((envelope.message_id, chat_id), 0)
        total = len(content.parts)
        requests = 0
        while index < total:
            await wait_for_slot(envelope, requests)
            requests += 1
            reply = await self._send_part(chat_id, content.parts[index])
            if isinstance(reply, _Migrated):
                # The new chat has no pace yet: resend at once, without a slot.
                self._progress.pop((envelope.message_id, chat_id), None)
                chat_id = reply.chat_id
                effects.append(UpdateTelegramChat(chat_id=chat_id))
                reply = await self._send_part(chat_id, content.parts[index])
                if isinstance(reply, _Migrated):
                    reply = PermanentFailure(
                        error_class="telegram_bad_request",
                        error="the chat migrated twice in a row; giving up",
                    )
            if isinstance(reply, _Delivered):
                delivered.append(str(reply.message_id))
                index += 1
                self._remember(envelope.message_id, chat_id, index)
                continue
            failure = self._after_failure(envelope.message_id, chat_id, reply, index, total)
            return _with_effects(failure, effects)
        self._progress.pop((envelope.message_id, chat_id), None)
        return Sent(provider_id=",".join(delivered) or None, effects=tuple(effects))

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    # --- internals -----------------------------------------------------------------

    def _remember(self, message_id: int, chat_id: int, parts_done: int) -> None:
        key = (message_id, chat_id)
        self._progress[key] = parts_done
        self._progress.move_to_end(key)
        while len(self._progress) > _REMEMBERED_MESSAGES:
            self._progress.popitem(last=False)

    def _after_failure(
        self, message_id: int, chat_id: int, outcome: Outcome, index: int, total: int
    ) -> Outcome:
        retried = isinstance(outcome, TransientFailure | RateLimited | ChannelOutage)
        if not retried:
            self._progress.pop((message_id, chat_id), None)
        if index == 0 or isinstance(outcome, Sent):
            return outcome
        note = f" (after {index} of {total} parts were delivered)"
        return dataclasses.replace(outcome, error=outcome.error + note)

    async def _send_part(self, chat_id: int, text: str) -> _Delivered | _Migrated | Outcome:
        payload: dict[str, Any] = {
            "chat_id": chat_id,
            "text": text,
            "parse_mode": "MarkdownV2",
            "link_preview_options": {"is_disabled": True},
        }
        secrets = (self._token.reveal(),)
        try:
            response = await self._client.post("sendMessage", json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return ChannelOutage(error_class="telegram_connect", error=describe_error(exc, secrets))
        except httpx.HTTPError as exc:
            return TransientFailure(
                error_class="telegram_network", error=describe_error(exc, secrets)
            )
        return self._classify(response, secrets)

    @staticmethod
    def _classify(
        response: httpx.Response, secrets: tuple[str, ...]
    ) -> _Delivered | _Migrated | Outcome:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        parameters = body.get("parameters")
        if not isinstance(parameters, dict):
            parameters = {}
        description = str(body.get("description") or response.reason_phrase or "no description")
        error = redact(f"{status} {description}", secrets)
        if status == 200 and body.get("ok") is True:
            result = body.get("result")
            message_id = result.get("message_id") if isinstance(result, dict) else None
            return _Delivered(message_id if isinstance(message_id, int) else 0)
        if status == 429:
            retry_after = parameters.get("retry_after") or response.headers.get("Retry-After")
            try:
                seconds = max(float(retry_after), 0.0) if retry_after is not None else 1.0
            except ValueError:
                seconds = 1.0
            return RateLimited(retry_after=seconds, error=error)
        if status == 400 and isinstance(parameters.get("migrate_to_chat_id"), int):
            return _Migrated(parameters["migrate_to_chat_id"])
        if status == 400 and "chat not found" in description.lower():
            return PermanentFailure(error_class="telegram_chat_not_found", error=error)
        if status == 403:
            return Unreachable(
                error_class="telegram_blocked", error=error, effects=(DisableTelegram(),)
            )
        if status in (401, 404):
            return ChannelOutage(error_class="telegram_auth", error=error)
        if status >= 500:
            return TransientFailure(error_class="telegram_5xx", error=error)
        return PermanentFailure(error_class="telegram_bad_request", error=error)
