"""A channel that outbox does not ship, as a plugin would add it: team chat.

:class:`ChatChannel` is the worked example of ``docs/channels.md`` ("Writing a channel
plugin"): a channel with a new name (``chat``), loaded through
``OUTBOX_CHANNEL_PLUGINS=chat=outbox.testing.plugins:chat_channel``. It posts the
text rendered from ``chat/<template>.txt.j2`` to the user's chat handle (their
address on channel ``chat``, set with ``outbox.set_address``) through a small JSON
API, and classifies every answer into an outcome.

:class:`ChatServer` is that API's loopback stand-in (HTTPS with the throwaway CA of
:mod:`outbox.testing.tls`): it checks the bearer token and the body, answers like a
provider (``{"id": "msg-1"}``), and can be told to fail for a handle.

==========================================  ========================================
answer                                      outcome
==========================================  ========================================
200 ``{"id": ...}``                         ``Sent`` with ``provider_id``
429 (``Retry-After``)                       ``RateLimited``
5xx, network error, timeout                 ``TransientFailure`` (retried)
404 (no such handle)                        ``Unreachable`` + ``MarkAddressUndeliverable``
403 (the user muted the bot)                ``Unreachable`` + ``DisableChannel``
401                                         ``ChannelOutage`` (breaker)
other 4xx                                   ``PermanentFailure``
==========================================  ========================================
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from outbox._errors import ConfigurationError
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableChannel,
    Envelope,
    MarkAddressUndeliverable,
    Outcome,
    PermanentFailure,
    RateLimited,
    RenderedText,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.testing.http_server import HttpRequest, HttpResponse, LoopbackHttpServer

NAME = "chat"
"""The channel's name: its row in ``outbox.channel``, its template folder."""


class ChatChannel:
    """Posts ``RenderedText`` to ``{url}/messages`` as ``{"to": handle, "text": ...}``.

    Reads its own settings (a plugin's, not outbox's): ``OUTBOX_CHAT_URL`` (https)
    and ``OUTBOX_CHAT_TOKEN`` (a secret: sent as a bearer token, never logged, never
    part of an error text).
    """

    name = NAME

    def __init__(
        self, environ: Mapping[str, str], *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        url = environ.get("OUTBOX_CHAT_URL", "")
        if not url.startswith("https://"):
            raise ConfigurationError("OUTBOX_CHAT_URL must be an https:// URL")
        token = environ.get("OUTBOX_CHAT_TOKEN", "")
        if not token:
            raise ConfigurationError("OUTBOX_CHAT_TOKEN is not set")
        self._client = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=httpx.Timeout(5.0),
            follow_redirects=False,  # a redirect must not carry the token elsewhere
        )

    async def send(self, envelope: Envelope) -> Outcome:
        handle = envelope.recipient.addresses.get(NAME)
        if handle is None:  # none set, or the provider refused it earlier
            return Unreachable(error_class="no_address", error="the user has no chat handle")
        if not isinstance(envelope.content, RenderedText):
            return PermanentFailure(error_class="render", error="chat needs plain text")
        try:
            answer = await self._client.post(
                "/messages", json={"to": handle, "text": envelope.content.text}
            )
        except httpx.HTTPError as error:
            return TransientFailure(error_class="chat_network", error=type(error).__name__)
        status = answer.status_code
        if status == 200:
            try:
                provider_id = answer.json()["id"]
            except (ValueError, KeyError, TypeError):
                provider_id = None
            return Sent(provider_id=provider_id if isinstance(provider_id, str) else None)
        detail = f"chat answered {status}"
        if status == 429:
            return RateLimited(retry_after=_seconds(answer.headers.get("Retry-After")))
        if status >= 500:
            return TransientFailure(error_class="chat_5xx", error=detail)
        if status == 404:
            effects = (MarkAddressUndeliverable(channel=NAME),)
            return Unreachable(error_class="chat_unknown_handle", error=detail, effects=effects)
        if status == 403:
            effects_off = (DisableChannel(channel=NAME),)
            return Unreachable(error_class="chat_muted", error=detail, effects=effects_off)
        if status == 401:
            return ChannelOutage(error_class="chat_auth", error=detail)
        return PermanentFailure(error_class="chat_4xx", error=detail)

    async def aclose(self) -> None:
        await self._client.aclose()


def _seconds(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.0), 3600.0)
    except ValueError:
        return 1.0


@dataclass(frozen=True)
class ChatMessage:
    """One message the stand-in accepted."""

    id: str
    to: str
    text: str


class ChatServer(LoopbackHttpServer):
    """The chat provider's API on loopback (HTTPS by default)."""

    def __init__(self, *, token: str = "chat-token", tls: bool = True) -> None:  # noqa: S107
        super().__init__(tls=tls)
        self.token = token
        self._lock = threading.Condition()
        self._failures: dict[str, list[int]] = {}
        self.messages: list[ChatMessage] = []
        self.requests: list[tuple[str, int]] = []

    def fail(self, handle: str, status: int, times: int = 1) -> None:
        """Answer ``status`` to the next ``times`` messages for ``handle``."""
        with self._lock:
            self._failures.setdefault(handle, []).extend([status] * times)

    def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or request.path != "/messages":
            return HttpResponse.json(404, {"error": "no such endpoint"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return HttpResponse.json(401, {"error": "bad token"})
        try:
            body = json.loads(request.body)
            handle, text = body["to"], body["text"]
        except (ValueError, KeyError, TypeError):
            return HttpResponse.json(400, {"error": "bad body"})
        if not isinstance(handle, str) or not isinstance(text, str) or not text:
            return HttpResponse.json(400, {"error": "bad body"})
        with self._lock:
            pending = self._failures.get(handle)
            status = pending.pop(0) if pending else 200
            self.requests.append((handle, status))
            if status == 200:
                message = ChatMessage(id=f"msg-{len(self.messages) + 1}", to=handle, text=text)
                self.messages.append(message)
            self._lock.notify_all()
        if status != 200:
            return HttpResponse.json(status, {"error": "as told"}, {"Retry-After": "1"})
        return HttpResponse.json(200, {"id": message.id})

    def wait_for_messages(self, count: int, timeout: float = 30.0) -> list[ChatMessage]:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{len(self.messages)} chat messages, expected {count}")
            return list(self.messages)


def environment(server: ChatServer) -> dict[str, str]:
    """What ``outbox dispatch`` needs to load the chat plugin against ``server``."""
    return {"OUTBOX_CHAT_URL": server.url, "OUTBOX_CHAT_TOKEN": server.token}
