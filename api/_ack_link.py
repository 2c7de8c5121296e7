"""``GET /ack/{token}``: a recipient acknowledges an alert by opening its link.

No login: the token is the credential. The dispatcher signs it into the alert's
``ack_url`` with ``Settings.ack_signing_key()`` (``outbox._ack_tokens``); it names one
message and expires. Answers:

===  ============================================================================
200  ``{"status": "acknowledged", "message_id": id}``: acknowledged now, or already
404  ``{"detail": "invalid or expired acknowledgement link"}``: forged, expired,
     malformed, signed with another key, or for a message nobody knows; one body
     whatever the reason, so a bad link learns nothing
409  ``{"status": state, "detail": "this alert can no longer be acknowledged"}``:
     the message exists but waits for no acknowledgement (not sent yet, say)
429  too many links that did not verify from this address within a minute
     (``OUTBOX_API_AUTH_FAILURES_PER_MINUTE``, a budget apart from the JWT one)
503  the database does not answer
===  ============================================================================

A browser (an ``Accept`` that prefers ``text/html``) gets the same status codes with a
short HTML page instead (``_ack_page``).

Only GET acknowledges. HEAD answers 405: Litestar routes no HEAD to a GET handler, so
a link checker that only looks changes nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import psycopg
from litestar import Request, Response, get
from litestar.exceptions import ServiceUnavailableException, TooManyRequestsException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath

from outbox import acknowledge_async
from outbox._ack_tokens import verify
from outbox._errors import InvalidAckToken
from outbox._queries import QUERIES
from outbox.api import _ack_page
from outbox.api._auth import FailedAuthLimit, client_address
from outbox.api._metrics import ApiMetrics
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext, ErrorBody

log = logging.getLogger("outbox.api")

INVALID_LINK = "invalid or expired acknowledgement link"
NOT_ACKNOWLEDGEABLE = "this alert can no longer be acknowledged"
NO_STORE = {"Cache-Control": "no-store"}
"""The answer belongs to one click: no proxy or browser cache replays it."""
_NOT_MIGRATED = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InvalidSchemaName,
)


class Acknowledged(msgspec.Struct, kw_only=True):
    """The alert is acknowledged (by this click or an earlier one)."""

    status: Literal["acknowledged"] = "acknowledged"
    message_id: int


class InvalidLink(msgspec.Struct, kw_only=True):
    """The link does not acknowledge anything; the detail never says why."""

    detail: str = INVALID_LINK


class NotAcknowledgeable(msgspec.Struct, kw_only=True):
    """The message is known but waits for no acknowledgement."""

    status: str
    detail: str = NOT_ACKNOWLEDGEABLE


@dataclass(frozen=True, kw_only=True)
class _Outcome:
    """What the database said: acknowledged now, and else the state it is in."""

    acknowledged_now: bool
    seconds_since_sent: float | None = None
    state: str | None = None
    already_acknowledged: bool = False


async def _acknowledge(context: ApiContext, message_id: int) -> _Outcome:
    params = {"message_id": message_id}
    try:
        async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
            # sent_at is read in the transaction that acknowledges: after it the row
            # is gone, and with it the start of the time to acknowledge
            async with conn.transaction():
                age = await (await conn.execute(QUERIES["api_ack_sent_age"], params)).fetchone()
                done = await acknowledge_async(conn, message_id)
            if done:
                return _Outcome(
                    acknowledged_now=True,
                    seconds_since_sent=None if age is None or age[0] is None else float(age[0]),
                )
            row = await (await conn.execute(QUERIES["api_ack_state"], params)).fetchone()
    except _NOT_MIGRATED as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except DB_ERRORS as error:
        log.warning("ack link: database unavailable error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error
    state, marked = row if row is not None else (None, False)
    return _Outcome(acknowledged_now=False, state=state, already_acknowledged=bool(marked))


@get(
    "/ack/{token:str}",
    exclude_from_auth=True,
    operation_id="acknowledgeAlert",
    summary="Acknowledge an alert through the link it carries (no login)",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    responses={
        200: ResponseSpec(
            data_container=Acknowledged,
            description="Acknowledged, by this request or an earlier one",
        ),
        404: ResponseSpec(
            data_container=InvalidLink,
            description="Forged, expired or malformed link, or an unknown message",
        ),
        409: ResponseSpec(
            data_container=NotAcknowledgeable,
            description="The message waits for no acknowledgement (e.g. not sent yet)",
        ),
        429: ResponseSpec(
            data_container=ErrorBody,
            description="Too many invalid links or tokens from this address; see Retry-After",
        ),
        503: ResponseSpec(data_container=ErrorBody, description="The database is unavailable"),
    },
)
async def acknowledge_by_link(
    token: FromPath[str], request: Request[Any, Any, Any]
) -> Response[Any]:
    """Acknowledge the alert ``token`` was signed for."""
    context: ApiContext = request.app.state["outbox"]
    # guessing links is throttled per address as guessing JWTs is: an address over its
    # budget is refused before its token is looked at
    guesses: FailedAuthLimit = request.app.state["ack_link_failures"]
    address = client_address(request.scope)
    wait = guesses.retry_after(address, time.monotonic())
    if wait > 0:
        raise TooManyRequestsException(
            "too many invalid acknowledgement links from this address",
            headers={"RateLimit-Reset": str(math.ceil(wait))},  # the app's 429 makes Retry-After
        )
    browser = request.accept.best_match([_ack_page.JSON, _ack_page.HTML]) == _ack_page.HTML
    platform = context.settings.platform_base_url

    def invalid() -> Response[Any]:
        if browser:
            return _ack_page.page(404, _ack_page.INVALID, platform)
        return Response(InvalidLink(), status_code=404, headers=NO_STORE)

    key = context.settings.ack_signing_key()
    try:
        if key is None:  # the API needs the JWT secret, so never; but refuse, not crash
            raise InvalidAckToken()
        message_id = verify(token, key=key)
    except InvalidAckToken:
        guesses.record_failure(address, time.monotonic())
        return invalid()

    outcome = await _acknowledge(context, message_id)
    if outcome.acknowledged_now:
        metrics: ApiMetrics = request.app.state["metrics"]
        metrics.acknowledgements.labels(via="link").inc()
        if outcome.seconds_since_sent is not None:
            metrics.time_to_acknowledge.observe(max(outcome.seconds_since_sent, 0.0))
        # DEBUG: the outbox.attempt row is the record; INFO stays quiet per event
        log.debug("acknowledged id=%d via=link", message_id)
    elif outcome.state is None:
        # signed by us, but gone without a trace (history pruned): as good as unknown
        return invalid()
    elif outcome.state != "acknowledged" and not outcome.already_acknowledged:
        if browser:
            return _ack_page.page(409, _ack_page.NOT_ACKNOWLEDGEABLE, platform)
        return Response(NotAcknowledgeable(status=outcome.state), status_code=409, headers=NO_STORE)
    if browser:
        return _ack_page.page(200, _ack_page.ACKNOWLEDGED, platform)
    return Response(Acknowledged(message_id=message_id), status_code=200, headers=NO_STORE)
