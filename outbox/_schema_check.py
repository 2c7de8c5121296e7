"""Is the database migrated? One answer for every command, the API and the dispatcher.

Before this, an unmigrated database surfaced as ``UndefinedTable`` tracebacks in the
CLI, a 500 from the API and a warning a second from the dispatcher. Now each asks
:func:`schema_problem` and says one thing: run ``outbox migrate``.

Where the revision is read: ``outbox_alembic_version`` (``outbox migrate``), else a
host application's ``alembic_version`` holding our branch's revision (docs/
migrations.md). When neither can be read (another version table name, or a role
without SELECT on it), the presence of the schema is all we can check, and it is
taken as migrated: a false alarm would stop a working deployment.

A database *ahead* of this code is fine: revisions stay compatible with the
dispatchers still running during a rolling upgrade (migrate first, then roll).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from outbox._errors import OutboxError
from outbox._migrate import VERSION_TABLE, migrations_path

_REVISION_FILE = re.compile(r"^(outbox_\d{4})_\w+\.py$")

PROBE = f"""
SELECT to_regnamespace('outbox') IS NOT NULL AND to_regclass('outbox.message') IS NOT NULL,
       CASE WHEN to_regclass('{VERSION_TABLE}') IS NOT NULL
             AND has_table_privilege(to_regclass('{VERSION_TABLE}'), 'SELECT')
            THEN '{VERSION_TABLE}' END,
       CASE WHEN to_regclass('alembic_version') IS NOT NULL
             AND has_table_privilege(to_regclass('alembic_version'), 'SELECT')
            THEN 'alembic_version' END
"""


class SchemaNotReady(OutboxError):
    """The database lacks the outbox schema, or holds an older revision of it."""


def head_revision() -> str:
    """The newest revision this installation ships (``outbox_NNNN``)."""
    names = (
        match.group(1)
        for path in (migrations_path() / "versions").iterdir()
        if (match := _REVISION_FILE.match(path.name))
    )
    return max(names)


def describe(has_schema: bool, revision: str | None, head: str) -> str | None:
    """What is wrong, in one sentence that ends with the fix; None when all is well."""
    if not has_schema:
        return "the database has no outbox schema: run `outbox migrate`"
    if revision is not None and revision < head:
        return (
            f"the database's outbox schema is at {revision} and this version needs {head}:"
            " run `outbox migrate`"
        )
    return None


def _version_sql(table: str) -> str:
    # our revisions only: a host's alembic_version also holds its own branches
    return f"SELECT max(version_num) FROM {table} WHERE version_num LIKE 'outbox\\_%'"


def schema_problem(conn: psycopg.Connection[Any]) -> str | None:
    """:func:`describe` for a synchronous connection (one or two small queries)."""
    row = conn.execute(PROBE).fetchone()
    assert row is not None
    has_schema, *tables = row
    revision = None
    for table in filter(None, tables):
        found = conn.execute(_version_sql(table)).fetchone()
        if found and found[0]:
            revision = found[0]
            break
    return describe(bool(has_schema), revision, head_revision())


async def schema_problem_async(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """:func:`describe` for an asynchronous connection."""
    row = await (await conn.execute(PROBE)).fetchone()
    assert row is not None
    has_schema, *tables = row
    revision = None
    for table in filter(None, tables):
        found = await (await conn.execute(_version_sql(table))).fetchone()
        if found and found[0]:
            revision = found[0]
            break
    return describe(bool(has_schema), revision, head_revision())
