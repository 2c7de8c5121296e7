"""``GET /api/v1/messages/{message_id}``: where one message is, for the owner.

The answer is :func:`outbox.message_status` (SQL ``outbox.message_state`` and
``outbox.message_attempts`` in one statement), so the owner sees what a producer
sees: the state (pending, sending, sent, dead, cancelled, expired, superseded,
awaiting_ack, acknowledged, skipped), the channel the message is on now while its row
exists, else the channel of its last attempt, and the attempts, oldest first. Error
texts are not shown (they may quote a provider's answer); error classes are.

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

from outbox import MessageStatus, message_status_async
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
    channel: str
    attempts: list[AttemptView]


class MessageNotFound(msgspec.Struct, kw_only=True):
    """No message with that id (or none the API may see)."""

    detail: str = NOT_FOUND


async def _read(context: ApiContext, message_id: int) -> MessageStatus | None:
    try:
        async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
            return await message_status_async(conn, message_id)
    except _NOT_MIGRATED as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except DB_ERRORS as error:
        log.warning("message status: database unavailable error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error


def _view(status: MessageStatus) -> MessageStatusView:
    return MessageStatusView(
        id=status.id,
        state=status.state,
        channel=status.channel,
        attempts=[
            AttemptView(
                attempt=a.attempt,
                channel=a.channel,
                outcome=a.outcome,
                error_class=a.error_class,
                # in UTC whatever the server's TimeZone: every answer spells times alike
                at=a.at.astimezone(UTC),
            )
            for a in status.attempts
        ],
    )


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
async def read_message_status(
    message_id: FromPath[int], request: Request[Any, Any, Any]
) -> Response[Any]:
    """Answer the state, channel and attempts of message ``message_id``."""
    if not 1 <= message_id <= BIGINT_MAX:
        # no queued message has such an id (test sends are negative): not found,
        # rather than the InvalidMessage outbox.message_status raises for it
        return Response(MessageNotFound(), status_code=404)
    status = await _read(request.app.state["outbox"], message_id)
    if status is None:
        return Response(MessageNotFound(), status_code=404)
    return Response(_view(status), status_code=200)
