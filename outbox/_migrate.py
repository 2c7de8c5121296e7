"""Schema migrations: ``outbox migrate`` and the pieces a host's Alembic needs.

outbox's revisions live in the ``outbox.migrations`` package (the repository's
``migrations/`` folder) on their own Alembic branch labelled ``outbox``. Each
revision runs the SQL file next to it (``<revision file>.upgrade.sql`` and
``.downgrade.sql``), the same statements ``sql/schema.sql`` describes.

Standalone, ``outbox migrate`` keeps its own version table,
``outbox_alembic_version``. A host application that already uses Alembic adds
:func:`version_location` to its ``version_locations`` instead and runs
``alembic upgrade heads`` (docs/migrations.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

VERSION_TABLE = "outbox_alembic_version"


def migrations_path() -> Path:
    """The folder holding ``env.py`` and ``versions/`` (inside the installed package)."""
    return Path(str(resources.files("outbox.migrations")))


def version_location() -> str:
    """The folder of outbox's revisions, for a host's ``version_locations``."""
    return str(migrations_path() / "versions")


def sqlalchemy_url(url: str) -> str:
    """Turn a libpq URL into a SQLAlchemy URL that uses psycopg 3."""
    if not url:
        # libpq's defaults: psycopg reads PGHOST, PGDATABASE, ... itself
        return "postgresql+psycopg://"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def run_sql_file(revision_file: str, direction: Literal["upgrade", "downgrade"]) -> None:
    """Execute ``<revision>.<direction>.sql`` inside the migration's transaction."""
    from alembic import op

    path = Path(revision_file).with_suffix(f".{direction}.sql")
    sql = path.read_text(encoding="utf-8")
    bind = op.get_bind()
    if op.get_context().as_sql:
        op.execute(sql)
        return
    # The driver connection runs multi-statement SQL (functions, DO blocks) as is,
    # in the transaction Alembic opened on it.
    driver = bind.connection.driver_connection
    assert driver is not None
    driver.execute(sql)


def alembic_config(database_url: str):  # type: ignore[no-untyped-def]
    """An Alembic ``Config`` for outbox's own migration environment."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "heads") -> None:
    """Apply outbox's migrations up to ``revision`` (``alembic upgrade heads``)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Undo outbox's migrations down to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)
