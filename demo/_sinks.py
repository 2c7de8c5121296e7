"""The providers of the demo: outbox.testing's loopback servers, writing to files.

They are the very servers outbox's test suite runs against (:mod:`outbox.testing`),
so the dispatchers run their production channel code against the real protocols.
Here each one also keeps what it accepts where a person can look at it:

* :class:`MailSink` (:class:`~outbox.testing.smtp.SmtpServer`) writes every accepted
  mail to ``mail/<Message-ID>.eml``; addresses listed in ``bounce`` get ``550 5.1.1``
  at ``RCPT``, addresses in ``flaky`` get ``451 4.3.0`` that many times first.
* :class:`TelegramSink` (:class:`~outbox.testing.telegram.TelegramServer`, which
  parses MarkdownV2 as Telegram does) appends to ``telegram.jsonl``; chats in
  ``blocked`` get ``403 Forbidden: bot was blocked by the user``, chats in ``flaky``
  a ``500`` that many times first.
* :class:`SmsSink` (:class:`~outbox.testing.twilio.TwilioServer` on ``https``)
  checks basic auth and the form like Twilio and appends every accepted SMS to
  ``sms.jsonl``; numbers in ``unsubscribed`` get ``400`` code ``21610`` (the user
  replied STOP). It posts Twilio's signed status callbacks (``sent``, ``delivered``)
  to the ``StatusCallback`` the dispatcher asked for: the demo's ``outbox api``.
* :class:`PushSink` (:class:`~outbox.testing.push.PushServer` on ``https``) checks
  the VAPID token, decrypts the ``aes128gcm`` body with the keys of the browser it
  made and appends the notification to ``push.jsonl``; subscriptions marked gone
  get ``410 Gone``.

All bind 127.0.0.1 on a free port and run on daemon threads of the demo process.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable, Mapping
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Self

from outbox.testing.push import PushServer, ReceivedPush
from outbox.testing.smtp import ReceivedMail, SmtpServer
from outbox.testing.telegram import TelegramMessage, TelegramServer
from outbox.testing.tls import LoopbackCertificate
from outbox.testing.twilio import TwilioMessage, TwilioServer

HOST = "127.0.0.1"


class JsonLines:
    """An append-only JSON-lines file and its line count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._lock = threading.Lock()
        path.write_text("", encoding="utf-8")

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a line."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(line)
            self.count += 1


class _RecordingSink:
    """A loopback server that appends what it accepts to a JSON-lines file."""

    _server: TelegramServer | PushServer | TwilioServer
    _records: JsonLines

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:port``."""
        return self._server.url

    @property
    def count(self) -> int:
        """Messages accepted so far."""
        return self._records.count

    def start(self) -> Self:
        """Listen on a free port; return self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        self._server.stop()


class MailSink:
    """An SMTP server that writes each accepted mail as an ``.eml`` file."""

    def __init__(
        self,
        directory: Path,
        *,
        bounce: Iterable[str] = (),
        flaky: Mapping[str, int] | None = None,
    ) -> None:
        self.directory = directory
        self.count = 0
        self._lock = threading.Lock()
        self._server = SmtpServer(on_message=self._write)
        for address in bounce:
            self._server.respond(address, f"550 5.1.1 <{address}>: mailbox unavailable")
        for address, times in (flaky or {}).items():
            self._server.respond(address, "451 4.3.0 mailbox busy, try again later", times=times)

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        return self._server.port

    def _write(self, mail: ReceivedMail) -> None:
        headers = BytesHeaderParser().parsebytes(mail.raw)
        # <outbox-42@demo.outbox.test> -> outbox-42.eml
        message_id = str(headers.get("Message-ID", "")).strip().strip("<>").split("@")[0]
        stem = re.sub(r"[^A-Za-z0-9._-]", "", message_id) or uuid.uuid4().hex
        with self._lock:
            path = self.directory / f"{stem}.eml"
            copy = 1
            while path.exists():  # a duplicate delivery keeps both copies
                copy += 1
                path = self.directory / f"{stem}-{copy}.eml"
            path.write_bytes(mail.raw)
            self.count += 1

    def start(self) -> MailSink:
        """Listen on a free port; return self."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop listening and end the server thread."""
        self._server.stop()


class TelegramSink(_RecordingSink):
    """``POST /bot<token>/sendMessage``, answered like the Bot API."""

    def __init__(
        self,
        record_file: Path,
        *,
        token: str,
        blocked: Iterable[int] = (),
        flaky: Mapping[int, int] | None = None,
    ) -> None:
        self._records = JsonLines(record_file)
        self._server = TelegramServer(token=token, on_message=self._write)
        for chat in blocked:
            self._server.block(chat)
        for chat, times in (flaky or {}).items():
            self._server.fail(chat, 500, times=times)

    def _write(self, message: TelegramMessage) -> None:
        self._records.append(
            {
                "chat_id": message.chat_id,
                "message_id": message.message_id,
                "parse_mode": message.parse_mode,
                "text": message.text,
            }
        )


class PushSink(_RecordingSink):
    """A Web Push service on ``https``: VAPID checked, ``aes128gcm`` decrypted."""

    _server: PushServer

    def __init__(
        self, record_file: Path, *, certificate: LoopbackCertificate, vapid_public_key: str
    ) -> None:
        self._records = JsonLines(record_file)
        self._vapid_key = vapid_public_key
        self._users: dict[str, str] = {}
        self._server = PushServer(tls=True, certificate=certificate, on_message=self._write)

    def subscribe(self, user_id: str, *, gone: bool = False) -> dict[str, Any]:
        """A browser subscribes: its ``PushSubscription.toJSON()``.

        With ``gone`` the subscription answers ``410 Gone`` (the user uninstalled or
        revoked it), as push services do.
        """
        browser = self._server.subscribe(application_server_key=self._vapid_key)
        self._users[browser.endpoint] = user_id
        if gone:
            self._server.expire(browser)
        return browser.info

    def _write(self, push: ReceivedPush) -> None:
        self._records.append(
            {
                "user_id": self._users.get(push.endpoint),
                "urgency": push.urgency,
                "topic": push.topic,
                "ttl": push.ttl,
                "notification": push.json(),
            }
        )


class SmsSink(_RecordingSink):
    """Twilio's Messages API on ``https``, answered like Twilio."""

    _server: TwilioServer

    def __init__(
        self,
        record_file: Path,
        *,
        certificate: LoopbackCertificate,
        account_sid: str,
        auth_token: str,
        unsubscribed: Iterable[str] = (),
    ) -> None:
        self._records = JsonLines(record_file)
        self._server = TwilioServer(
            account_sid=account_sid,
            auth_token=auth_token,
            tls=True,
            certificate=certificate,
            on_message=self._write,
        )
        for number in unsubscribed:
            self._server.unsubscribed(number)

    @property
    def reports(self) -> dict[str, int]:
        """Status callbacks the API accepted (204), per status: what Twilio reported."""
        counted: dict[str, int] = {}
        for callback in self._server.callbacks:
            if callback.status == 204:
                counted[callback.message_status] = counted.get(callback.message_status, 0) + 1
        return counted

    def _write(self, message: TwilioMessage) -> None:
        self._records.append(
            {"sid": message.sid, "to": message.to, "from": message.sender, "body": message.body}
        )


def free_port() -> int:
    """A free TCP port on loopback (for the API under ``--keep``)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])
