"""Test channels: in-process recording, and an HTTP one for dispatcher subprocesses."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from outbox import Settings
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    Envelope,
    Outcome,
    PermanentFailure,
    RateLimited,
    RenderedEmail,
    RenderedPush,
    RenderedTelegram,
    Sent,
    TransientFailure,
    Unreachable,
)


@dataclass
class RecordingChannel:
    """Records envelopes; ``answer(envelope)`` decides the outcome (default: Sent)."""

    name: str = "email"
    answer: Callable[[Envelope], Outcome] = lambda envelope: Sent()
    delay: float = 0.0
    sent: list[tuple[float, Envelope]] = field(default_factory=list)

    async def send(self, envelope: Envelope) -> Outcome:
        self.sent.append((time.time(), envelope))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer(envelope)

    async def aclose(self) -> None:
        pass


class HttpRecorderChannel:
    """Posts each message to OUTBOX_TEST_RECORDER_URL and maps the status to an outcome."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = os.environ["OUTBOX_TEST_RECORDER_URL"]
        self.client = httpx.AsyncClient(timeout=10)
        self.dispatcher = str(os.getpid())

    async def send(self, envelope: Envelope) -> Outcome:
        try:
            response = await self.client.post(
                self.url,
                json={
                    "message_id": envelope.message_id,
                    "channel": envelope.channel,
                    "user_id": envelope.user_id,
                    "attempt": envelope.attempt,
                    "lane": envelope.lane,
                    "dispatcher": self.dispatcher,
                },
            )
        except httpx.HTTPError as error:
            return TransientFailure(error_class="network", error=type(error).__name__)
        status = response.status_code
        if status == 200:
            return Sent()
        if status == 429:
            return RateLimited(retry_after=2.0)
        if status == 404:
            return Unreachable(error_class="no_address", error="recorder says 404")
        if status == 503:
            return ChannelOutage(error_class="outage", error="recorder says 503")
        if 400 <= status < 500:
            return PermanentFailure(error_class="rejected", error=f"recorder says {status}")
        return TransientFailure(error_class="server_error", error=f"recorder says {status}")

    async def aclose(self) -> None:
        await self.client.aclose()


def email(settings: Settings) -> HttpRecorderChannel:
    return HttpRecorderChannel("email")


def telegram(settings: Settings) -> HttpRecorderChannel:
    return HttpRecorderChannel("telegram")


def push(settings: Settings) -> HttpRecorderChannel:
    return HttpRecorderChannel("push")


class FileRecorderChannel:
    """Appends one JSON line per delivered message to OUTBOX_TEST_RECORD_FILE.

    For dispatcher subprocesses in acceptance tests: O_APPEND writes of one short
    line are atomic, so several processes can share the file. The optional
    OUTBOX_TEST_SEND_DELAY (seconds) makes each send take that long.
    """

    def __init__(self, name: str) -> None:
        import json

        self.name = name
        self._dumps = json.dumps
        self._fd = os.open(
            os.environ["OUTBOX_TEST_RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
        self._delay = float(os.environ.get("OUTBOX_TEST_SEND_DELAY", "0"))
        self._pid = str(os.getpid())

    async def send(self, envelope: Envelope) -> Outcome:
        if self._delay:
            await asyncio.sleep(self._delay)
        line = (
            self._dumps(
                {
                    "message_id": envelope.message_id,
                    "channel": envelope.channel,
                    "user_id": envelope.user_id,
                    "attempt": envelope.attempt,
                    "lane": envelope.lane,
                    # what the provider saw: tests key deliveries on a token in it
                    "subject": getattr(envelope.content, "subject", None),
                    "text": _visible_text(envelope.content),
                    "dispatcher": self._pid,
                    "received_at": time.time(),
                    "status": 200,
                }
            )
            + "\n"
        )
        os.write(self._fd, line.encode())
        return Sent()

    async def aclose(self) -> None:
        os.close(self._fd)


def _visible_text(content: object) -> str | None:
    """The headline the user sees first: an email's subject, a Telegram text, a push
    notification's title."""
    if isinstance(content, RenderedEmail):
        return content.subject
    if isinstance(content, RenderedTelegram):
        return "".join(content.parts)
    if isinstance(content, RenderedPush):
        title = content.payload.get("title")
        return title if isinstance(title, str) else None
    return None


def file_email(settings: Settings) -> FileRecorderChannel:
    return FileRecorderChannel("email")


def file_telegram(settings: Settings) -> FileRecorderChannel:
    return FileRecorderChannel("telegram")


def file_push(settings: Settings) -> FileRecorderChannel:
    return FileRecorderChannel("push")
