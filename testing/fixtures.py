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
from typing import Any, Protocol, TypeVar

import pytest

from outbox._settings import Secret, Settings
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer

TELEGRAM_TOKEN = "123456789:AAE-test-token_0123456789abcdefghijkl"  # noqa: S105 (fake)
SMTP_USERNAME = "outbox-bot"
SMTP_PASSWORD = "smtp-pa55word-never-shown"  # noqa: S105 (fake)
SENDER = "alerts@outbox.test"


class _Server(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


def _stopped_afterwards(server: S) -> Iterator[S]:
    try:
        yield server
    finally:
        server.stop()


def _factory(start: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """A fixture body: ``start(**options)`` makes a started server; all stop afterwards."""
    made: list[S] = []

    def factory(**options: Any) -> S:
        server = start(**options)
        made.append(server)
        return server

    try:
        yield factory
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A recording SMTP server on loopback (plain SMTP, no AUTH), stopped afterwards."""
    yield from _stopped_afterwards(SmtpServer().start())


@pytest.fixture
def smtp_server_factory() -> Iterator[Callable[..., SmtpServer]]:
    """Start SMTP servers with options (``tls=``, ``username=``...); all stop afterwards."""
    yield from _factory(lambda **options: SmtpServer(**options).start())


@pytest.fixture
def telegram_server() -> Iterator[TelegramServer]:
    """A Bot API ``sendMessage`` server on loopback, with the token ``TELEGRAM_TOKEN``."""
    yield from _stopped_afterwards(TelegramServer(token=TELEGRAM_TOKEN).start())


@pytest.fixture
def push_server() -> Iterator[PushServer]:
    """A Web Push service on loopback that checks VAPID and decrypts payloads."""
    yield from _stopped_afterwards(PushServer().start())


@pytest.fixture
def push_server_factory() -> Iterator[Callable[..., PushServer]]:
    """Start Web Push services with options; all stop afterwards."""
    yield from _factory(lambda **options: PushServer(**options).start())


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
