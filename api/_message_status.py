"""``GET /api/v1/messages/{message_id}``: where one message is, for the owner.

The state comes from SQL ``outbox.message_status`` (pending, sending, sent, dead,
cancelled, expired, superseded, awaiting_ack, acknowledged, skipped) and the history
from ``outbox.message_attempts``, oldest first, so the answer is the one a producer
gets from ``outbox.message_status(conn, id)``. ``channel`` is the channel the message
is on now while its row exists, else the channel of its last attempt. Error texts are
not shown (they may quote a provider's answer); error classes are.

===  ============================================================================
200  ``{id, state, channel, attempts: [{attempt, channel, outcome, error_class, at}]}``
404  ``{"detail": "message not found"}``: no such message (a test send's negative id
     included: test sends are not messages)
401  no token or a bad one; 403 the role is not owner
503  the database does not answer
===  ============================================================================
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response, get
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath

from outbox._queries import QUERIES
from outbox.api._auth import SECURITY_SCHEME, owner_only
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext, ErrorBody

log = logging.getLogger("outbox.api")

NOT_FOUND = "message not found"
BIGINT_MAX = 2**63 - 1
_NOT_MIGRATED = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName,
)


class AttemptView(msgspec.Struct, kw_only=True):
    """One row of the message's delivery log."""

    attempt: int
    channel: str
    outcome: str
    error_class: str | None
    at: datetime


class MessageStatusView(msgspec.Struct, kw_only=True):
    """The message's state, its channel and its delivery log, oldest first."""

    id: int
    state: str
    channel: str | None
    attempts: list[AttemptView]


class MessageNotFound(msgspec.Struct, kw_only=True):
    """No message with that id (or none the API may see)."""

    detail: str = NOT_FOUND


async def _read(context: ApiContext, message_id: int) -> MessageStatusView | None:
    params = {"message_id": message_id}
    try:
        # one snapshot for the state and the log: a finish between two statements
        # would show a state its attempts do not explain
        async with (
            context.pool.connection(timeout=DB_TIMEOUT) as conn,
            conn.transaction(),
        ):
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            status = await (await conn.execute(QUERIES["api_message_status"], params)).fetchone()
            rows = await (await conn.execute(QUERIES["api_message_attempts"], params)).fetchall()
    except _NOT_MIGRATED as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except DB_ERRORS as error:
        log.warning("message status: database unavailable error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error
    if status is None or status[0] is None:
        return None
    state, current_channel = status
    attempts = [
        # in UTC whatever the server's TimeZone, so clients compare strings as times
        AttemptView(attempt=a, channel=c, outcome=o, error_class=e, at=at.astimezone(UTC))
        for a, c, o, e, at in rows
    ]
    channel = current_channel or (attempts[-1].channel if attempts else None)
    return MessageStatusView(id=message_id, state=state, channel=channel, attempts=attempts)


@get(
    "/api/v1/messages/{message_id:int}",
    guards=[owner_only],
    security=[{SECURITY_SCHEME: []}],
    operation_id="getMessageStatus",
    summary="The state and delivery log of one message (owner only)",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    responses={
        200: ResponseSpec(data_container=MessageStatusView, description="The message"),
        401: ResponseSpec(
            data_container=ErrorBody, description="No token, or a bad, expired or unsigned one"
        ),
        403: ResponseSpec(data_container=ErrorBody, description="The token's role is not owner"),
        404: ResponseSpec(data_container=MessageNotFound, description="No such message"),
        503: ResponseSpec(data_container=ErrorBody, description="The database is unavailable"),
    },
)
async def message_status(
    message_id: FromPath[int], request: Request[Any, Any, Any]
) -> Response[Any]:
    """Answer the state, channel and attempts of message ``message_id``."""
    if not 1 <= message_id <= BIGINT_MAX:
        # no queued message has such an id (test sends are negative); and a number
        # beyond bigint would reach PostgreSQL as numeric, which no function takes
        return Response(MessageNotFound(), status_code=404)
    view = await _read(request.app.state["outbox"], message_id)
    if view is None:
        return Response(MessageNotFound(), status_code=404)
    return Response(view, status_code=200)
