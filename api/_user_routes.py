"""What every route of a user's own (``role: "user"``) declares alike.

The guard (:func:`~outbox.api._auth.user_only`), the OpenAPI security requirement,
and the answers any of them may give besides its own: 401 (no token, a bad one, or
one without ``sub``), 403 (the role is not ``user``), 429 (too many failed
authentications from the caller's address), 503 (the database).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import ResponseSpec

from outbox.api._auth import SECURITY_SCHEME, user_only
from outbox.api._testsend import ErrorBody, json_depth

USER_ROUTE: dict[str, Any] = {"guards": [user_only], "security": [{SECURITY_SCHEME: []}]}
"""Keyword arguments of every user's route decorator."""

_COMMON = {
    401: ResponseSpec(
        data_container=ErrorBody,
        description="No token, a bad, expired or unsigned one, or one without sub",
    ),
    403: ResponseSpec(data_container=ErrorBody, description="The token's role is not user"),
    429: ResponseSpec(
        data_container=ErrorBody,
        description="Too many failed authentications from this address; see Retry-After",
    ),
    503: ResponseSpec(data_container=ErrorBody, description="The database is unavailable"),
}


def user_responses(extra: dict[int, ResponseSpec] | None = None) -> dict[int, ResponseSpec]:
    """The 401, 403 and 503 every user's route may answer, and the route's own."""
    return {**_COMMON, **(extra or {})}


Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Any]


def nesting_guard(max_depth: int) -> Guard:
    """Guard: 400 for a body whose JSON nests deeper than ``max_depth``.

    Litestar parses a body as JSON before it checks it against the route's schema,
    and that parser recurses: 10,000 nested arrays would end in ``RecursionError``
    (a 500). The depth is counted on the raw bytes first (``json_depth``).
    """

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if isinstance(connection, Request) and json_depth(await connection.body()) > max_depth:
            raise ClientException(f"the body nests deeper than {max_depth} levels")

    return guard
