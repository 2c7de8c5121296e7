"""Loopback stand-ins for the providers, and what they share.

They speak the real protocols, so the dispatchers run their production channel code
against them, and they keep what they receive where a person can look at it:

* :class:`MailSink` (aiosmtpd, here) writes every accepted mail to
  ``mail/<Message-ID>.eml``; addresses listed in ``bounce`` get ``550 5.1.1`` at
  ``RCPT``, addresses in ``flaky`` get ``451 4.3.0`` that many times first.
* :class:`~outbox.demo._http_sinks.TelegramSink` and
  :class:`~outbox.demo._http_sinks.PushSink`: the Telegram Bot API and a Web Push
  service (see that module).

All bind 127.0.0.1 on a free port and run on daemon threads of the demo process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable, Mapping
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"


class Countdown:
    """Per-key counters of scripted failures left (thread-safe)."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self._left = {key.lower(): n for key, n in counts.items()}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            left = self._left.get(key.lower(), 0)
            if left <= 0:
                return False
            self._left[key.lower()] = left - 1
            return True


class JsonLines:
    """An append-only JSON-lines file and its line count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._lock = threading.Lock()
        path.write_text("", encoding="utf-8")

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(line)
            self.count += 1


# --- SMTP ------------------------------------------------------------------------------


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
        self.port = 0
        self.count = 0
        self._bounce = {address.lower() for address in bounce}
        self._flaky = Countdown(flaky or {})
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # aiosmtpd handler hooks

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Bounce, defer or accept one recipient."""
        if address.lower() in self._bounce:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        if self._flaky.take(address):
            return "451 4.3.0 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Write the mail to ``<Message-ID>.eml``."""
        raw = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(raw)
        # <outbox-42@demo.outbox.test> -> outbox-42.eml
        message_id = str(headers.get("Message-ID", "")).strip().strip("<>").split("@")[0]
        stem = re.sub(r"[^A-Za-z0-9._-]", "", message_id) or uuid.uuid4().hex
        with self._lock:
            path = self.directory / f"{stem}.eml"
            copy = 1
            while path.exists():  # a duplicate delivery keeps both copies
                copy += 1
                path = self.directory / f"{stem}-{copy}.eml"
            path.write_bytes(raw)
            self.count += 1
        return "250 2.0.0 Message accepted for delivery"

    # lifecycle

    def start(self) -> MailSink:
        """Listen on a free port; return self."""
        self.directory.mkdir(parents=True, exist_ok=True)
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            factory = lambda: SMTP(self, hostname="outbox-demo-smtp", loop=loop)  # noqa: E731
            self._server = loop.run_until_complete(loop.create_server(factory, HOST, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="demo-smtp", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("the demo SMTP server did not start")
        return self

    def stop(self) -> None:
        """Stop listening and end the server thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.call_soon(loop.stop)

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        thread.join(timeout=10)
        self._loop = self._thread = None


def free_port() -> int:
    """A free TCP port on loopback (for the API under ``--keep``)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])
