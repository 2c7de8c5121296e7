"""The client-side deadline of the dispatcher's and the API's connections.

Against the real test database, through the black-hole proxy of
``tests/support/tcp_proxy.py``: a slow statement is cancelled and its connection
lives on; a silent connection is closed within the deadline plus psycopg's
cancellation attempt, and every connection opened before it is abandoned at once
instead of waiting out a deadline of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

from outbox import ConfigurationError, Settings
from outbox._db import CONNECT_KWARGS, connect_kwargs, deadline_connection_class
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def proxied(database_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """The test database behind the proxy, over TCP (also for a Unix-socket server)."""
    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    socket_dir = query.pop("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.pop("port", [parts.port or 5432])[0])
    with TcpProxy(socket_dir, port) as proxy:
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        netloc = f"{user}127.0.0.1:{proxy.port}"
        yield (
            proxy,
            urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True), "")),
        )


async def test_a_slow_statement_is_cancelled_and_its_connection_lives_on(
    database_url: str,
) -> None:
    cls = deadline_connection_class(1.0)
    async with await cls.connect(database_url, autocommit=True, **CONNECT_KWARGS) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match=r"within 1 s.*query cancelled"):
            await conn.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 3
        assert not conn.closed
        assert await (await conn.execute("SELECT 42")).fetchone() == (42,)


async def test_a_silent_connection_fails_in_bounded_time_and_takes_older_ones_with_it(
    proxied: tuple[TcpProxy, str],
) -> None:
    proxy, url = proxied
    cls = deadline_connection_class(1.5)
    first = await cls.connect(url, autocommit=True, **CONNECT_KWARGS)
    second = await cls.connect(url, autocommit=True, **CONNECT_KWARGS)
    try:
        assert proxy.blackhole() == 2
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="connection closed"):
            await first.execute("SELECT 1")
        noticed = time.monotonic() - started
        assert first.closed
        assert noticed < 1.5 + 5 + 2, noticed  # deadline + psycopg's cancel attempt

        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="abandoned"):
            await second.execute("SELECT 1")
        assert time.monotonic() - started < 0.5
        async with await cls.connect(url, autocommit=True, **CONNECT_KWARGS) as fresh:
            assert await (await fresh.execute("SELECT 7")).fetchone() == (7,)
    finally:
        await first.close()
        await second.close()


def test_the_connection_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "OUTBOX_DB_TIMEOUT": "4.5",
            "OUTBOX_PREPARED_STATEMENTS": "off",
            "OUTBOX_LISTEN_DATABASE_URL": "postgresql://direct/db",
        }
    )
    assert settings.db_timeout == 4.5
    assert settings.listen_database_url == "postgresql://direct/db"
    assert connect_kwargs(settings)["prepare_threshold"] is None
    assert "prepare_threshold" not in connect_kwargs(Settings.from_env({}))
    assert connect_kwargs(settings)["tcp_user_timeout"] == 15_000
    with pytest.raises(ConfigurationError, match="OUTBOX_PREPARED_STATEMENTS"):
        Settings.from_env({"OUTBOX_PREPARED_STATEMENTS": "maybe"})
    with pytest.raises(ConfigurationError, match="OUTBOX_DB_TIMEOUT"):
        Settings.from_env({"OUTBOX_DB_TIMEOUT": "0"})
