"""One connection from the API's pool for a request, and what its failures answer.

The users' routes share this: the database down or unreachable in time is 503 (the
request changed nothing it could confirm), an unmigrated schema is 503 with what to
run, and a privilege the API's role lacks is 503 that says so (a deployment problem,
not the caller's: logged at ERROR once per request, with the statement's error).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from litestar.exceptions import ServiceUnavailableException

from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext

log = logging.getLogger("outbox.api")

NOT_MIGRATED = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InvalidSchemaName,
)


@asynccontextmanager
async def database(context: ApiContext, route: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection; database failures inside become 503 for ``route``."""
    try:
        async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
            yield conn
    except NOT_MIGRATED as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except psycopg.errors.InsufficientPrivilege as error:
        log.error("%s: the API's database role lacks a privilege: %s", route, error)
        raise ServiceUnavailableException(
            "the API's database role lacks a privilege this route needs (docs/api.md)"
        ) from error
    except DB_ERRORS as error:
        log.warning("%s: database unavailable error=%s", route, type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error
