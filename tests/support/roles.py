"""Login roles that belong to one of outbox's group roles, for least-privilege tests.

    with login_role(admin, database_url, "outbox_dispatcher") as url:
        ...  # connect with url: a fresh LOGIN role IN ROLE outbox_dispatcher

The role is dropped afterwards (its sessions terminated first).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg


@contextmanager
def login_role(admin: psycopg.Connection[Any], database_url: str, group: str) -> Iterator[str]:
    """The URL of a new login role in ``group`` on ``database_url``'s database."""
    role = f"r_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE {group}")
    parts = urlsplit(database_url)
    netloc = parts.netloc.split("@", 1)[-1]
    try:
        yield urlunsplit((parts.scheme, f"{role}@{netloc}", parts.path, parts.query, ""))
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        admin.execute(f"DROP ROLE {role}")
