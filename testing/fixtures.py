"""Pytest fixtures for the loopback servers (loaded by ``tests/conftest.py``).

==========================  ===========================================================
``smtp_server``             a plain recording :class:`SmtpServer` (no TLS, no AUTH)
``smtp_server_factory``     ``factory(tls=..., username=..., password=...)`` -> started
                            server; every server made is stopped at teardown
``telegram_server``         a :class:`TelegramServer` for :data:`TELEGRAM_TOKEN`
``push_server``             a plain-HTTP :class:`PushServer`
``push_server_factory``     ``factory(tls=True)`` -> started server, stopped at teardown
``vapid_keys``              a fresh :class:`VapidKeys` pair (raw base64url and PEM)
``loopback_settings``       ``Settings`` pointing at all three servers, with the VAPID
                            key and ``push_allowed_hosts=("127.0.0.1",)``
==========================  ===========================================================

All servers are function-scoped: each test gets fresh ones on new free ports, and
they need no database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox._settings import Secret, Settings
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer

TELEGRAM_TOKEN = "123456789:AAE-test-token_0123456789abcdefghijkl"  # noqa: S105 (fake)
SMTP_USERNAME = "outbox-bot"
SMTP_PASSWORD = "smtp-pa55word-never-shown"  # noqa: S105 (fake)
SENDER = "alerts@outbox.test"


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A recording SMTP server on loopback (plain SMTP, no AUTH), stopped afterwards."""
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_server_factory() -> Iterator[Callable[..., SmtpServer]]:
    """Start SMTP servers with options (``tls=``, ``username=``...); all stop afterwards."""
    made: list[SmtpServer] = []

    def factory(**options: Any) -> SmtpServer:
        server = SmtpServer(**options).start()
        made.append(server)
        return server

    try:
        yield factory
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def telegram_server() -> Iterator[TelegramServer]:
    """A Bot API ``sendMessage`` server on loopback, with the token ``TELEGRAM_TOKEN``."""
    server = TelegramServer(token=TELEGRAM_TOKEN).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def push_server() -> Iterator[PushServer]:
    """A Web Push service on loopback that checks VAPID and decrypts payloads."""
    server = PushServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def push_server_factory() -> Iterator[Callable[..., PushServer]]:
    """Start Web Push services with options; all stop afterwards."""
    made: list[PushServer] = []

    def factory(**options: Any) -> PushServer:
        server = PushServer(**options).start()
        made.append(server)
        return server

    try:
        yield factory
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def vapid_keys() -> VapidKeys:
    """A fresh VAPID key pair."""
    return VapidKeys.generate()


@pytest.fixture
def loopback_settings(
    smtp_server: SmtpServer,
    telegram_server: TelegramServer,
    push_server: PushServer,
    vapid_keys: VapidKeys,
) -> Settings:
    """``outbox.Settings`` whose channels deliver to the three loopback servers."""
    return Settings(
        **smtp_server.settings_overrides(),
        smtp_from=SENDER,
        **telegram_server.settings_overrides(),
        vapid_private_key=Secret(vapid_keys.private_raw),
        vapid_public_key=vapid_keys.public_raw,
        vapid_subject="mailto:ops@outbox.test",
        push_allowed_hosts=("127.0.0.1",),
    )
