"""A host application's Alembic runs outbox's revisions from alembic.ini alone, and a
database migrated with ``outbox migrate`` moves to the host's version table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg

from outbox._migrate import sqlalchemy_url

HOST_REVISION = (
    'from alembic import op\n\nrevision = "host_0001"\ndown_revision = None\n'
    "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n"
    '    op.execute("CREATE SCHEMA trading")\n\n\ndef downgrade():\n'
    '    op.execute("DROP SCHEMA trading")\n'
)


def host_project(folder: Path, database_url: str) -> Path:
    """``alembic init`` plus the settings docs/migrations.md gives for alembic.ini."""
    from alembic import command
    from alembic.config import Config

    command.init(Config(str(folder / "alembic.ini")), str(folder / "migrations"))
    ini = folder / "alembic.ini"
    text = re.sub(
        r"^sqlalchemy\.url = .*$",
        "sqlalchemy.url = " + sqlalchemy_url(database_url).replace("%", "%%"),
        ini.read_text(),
        flags=re.MULTILINE,
    )
    # the documented lines: a package resource path, and a separator that is not ":"
    text = re.sub(r"^path_separator = .*$", "path_separator = space", text, flags=re.MULTILINE)
    text = text.replace(
        "[alembic]\n",
        "[alembic]\nversion_locations = %(here)s/migrations/versions outbox.migrations:versions\n",
        1,
    )
    ini.write_text(text)
    (folder / "migrations" / "versions" / "host_0001_trading.py").write_text(HOST_REVISION)
    return ini


def alembic(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_ini_names_outbox_revisions_by_package_path(
    empty_database_url: str, tmp_path: Path
) -> None:
    host_project(tmp_path, empty_database_url)

    result = alembic(tmp_path, "upgrade", "heads")

    assert result.returncode == 0, result.stderr
    with psycopg.connect(empty_database_url) as conn:
        heads = conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
        assert heads[0] == ("host_0001",) and heads[1][0].startswith("outbox_")
        assert conn.execute("SELECT count(*) FROM outbox.queue_stats").fetchone() == (0,)


def test_a_standalone_database_moves_to_the_hosts_version_table_and_upgrades_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    """docs/migrations.md, "Moving from outbox migrate": stamp the revision that
    ``outbox_alembic_version`` holds (not the first one), then drop that table."""
    host_project(tmp_path, database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT version_num FROM outbox_alembic_version").fetchone()
        assert row is not None
        reached = row[0]

    stamped = alembic(tmp_path, "stamp", reached)
    assert stamped.returncode == 0, stamped.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE outbox_alembic_version")
    upgraded = alembic(tmp_path, "upgrade", "heads")

    assert upgraded.returncode == 0, upgraded.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall() == [
            ("host_0001",),
            (reached,),
        ]
