"""``POST /api/v1/messaging/test``: render and send one message now, for the owner.

The request never touches the queue: it renders with the dispatcher's renderer and
awaits the dispatcher's channel code directly, then logs one ``outbox.attempt`` row
with ``is_test = true``. Answers:

===  ===========================================================================
200  ``{status: "sent", message_id, delivery_time_ms, error: null}``
502  ``{status: "failed", ...}``: the provider did not accept it; ``error`` says why
400  unknown template, missing or unusable variables (nested deeper than
     ``outbox.MAX_VARS_DEPTH``), no address on that channel
404  no ``outbox.recipient`` row for ``user_id``
422  the body does not match the schema; 413 over 64 KiB; 401/403/429 see ``_auth``
503  the database does not answer
===  ===========================================================================

Test message ids are negative (``-microseconds since the epoch``, strictly
decreasing within a process), so they never collide with queued messages, whose
ids are positive identities, and the email ``Message-ID`` stays unique per send.
Provider side effects (a blocked bot, a bounced address, a gone push subscription,
a migrated chat) are written to the recipient just as the dispatcher would. No
cluster rate limit or circuit breaker applies: the endpoint has its own limit.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Annotated, Any, Literal

import msgspec
import psycopg
import psycopg_pool
from litestar import Request, Response, post
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
    ServiceUnavailableException,
)
from litestar.handlers import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.security.jwt import Token
from psycopg_pool import AsyncConnectionPool

from outbox import MAX_VARS_DEPTH
from outbox._errors import InvalidMessage, TemplateRenderError
from outbox._queries import QUERIES
from outbox._settings import Settings
from outbox._templates import TemplateCatalog
from outbox.api._auth import SECURITY_SCHEME, owner_only
from outbox.dispatcher import delivery
from outbox.dispatcher.channels.base import CHANNELS, Channel, Effect, Sent, TransientFailure
from outbox.dispatcher.delivery import Attempt, RecipientRecord, clip_error, failure_of
from outbox.dispatcher.rendering import RenderCache

log = logging.getLogger("outbox.api")

MAX_BODY_BYTES = 64 * 1024
SEND_TIMEOUT = 30.0
DB_TIMEOUT = 5.0
DB_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, OSError, TimeoutError)


class MessagingTestRequest(msgspec.Struct, kw_only=True):
    """What to send, to whom, on which channel."""

    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    # any channel of outbox.channel with templates, a plugin's too; the catalog says
    # which (400 for one it does not know)
    channel: Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]{0,31}$")]
    template_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    template_vars: dict[str, Any]


class MessagingTestResult(msgspec.Struct, kw_only=True):
    """The provider's verdict on one test send."""

    status: Literal["sent", "failed"]
    message_id: int
    delivery_time_ms: float
    error: str | None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Litestar's error answer: the status code, a detail, sometimes more."""

    status_code: int
    detail: str
    extra: Any = None


@dataclass(frozen=True, kw_only=True)
class ApiContext:
    """What the handlers share for the app's lifetime (built at startup)."""

    settings: Settings
    catalog: TemplateCatalog
    renderer: RenderCache
    channels: Mapping[str, Channel]
    pool: AsyncConnectionPool[Any]


_id_lock = threading.Lock()
_last_id = 0


def next_test_message_id() -> int:
    """Return a negative id, unique and strictly decreasing within this process."""
    global _last_id
    with _id_lock:
        candidate = -(time.time_ns() // 1000)
        _last_id = min(candidate, _last_id - 1)
        return _last_id


_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in _BRACKET_STEP)


def json_depth(body: bytes) -> int:
    """Deepest nesting of objects and arrays in JSON text, counted without parsing it.

    Strings are cut out first (a ``[`` inside one is text), then the brackets
    are counted: linear time, no recursion, whatever the document. Malformed
    JSON gets a number too; its parser refuses it afterwards.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


async def vars_depth_guard(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: 400 for ``template_vars`` nested deeper than ``outbox.MAX_VARS_DEPTH``.

    It runs before the body is parsed, because the parser itself recurses: a 60 KB
    body nesting 10,000 arrays would end in ``RecursionError`` (a 500) otherwise.
    The body object is one level above ``template_vars``. Litestar keeps the body
    it read here for the parser, and still applies the 64 KiB limit (413).
    """
    if not isinstance(connection, Request):
        return
    if json_depth(await connection.body()) > MAX_VARS_DEPTH + 1:
        raise ClientException(
            f"template_vars nest deeper than {MAX_VARS_DEPTH} levels (the vars object is"
            " level 1; every object or array inside adds one)"
        )


def address_problem(record: RecipientRecord, channel: str) -> str | None:
    """Why ``record`` cannot be reached on ``channel``, or None when it can."""
    if channel in record.disabled_channels:
        return f"the user disabled {channel}"
    addresses = record.addresses()
    if channel == "email" and addresses.email is None:
        return "the user has no deliverable email address"
    if channel == "telegram" and addresses.telegram_chat_id is None:
        return "the user has no Telegram chat (none stored, or the bot is blocked)"
    if channel == "push" and not addresses.push_subscriptions:
        return "the user has no push subscription"
    if not addresses.reaches(channel):
        return f"the user has no usable {channel} address"
    return None


async def _load_recipient(pool: AsyncConnectionPool[Any], user_id: str) -> RecipientRecord | None:
    try:
        async with pool.connection(timeout=DB_TIMEOUT) as conn:
            return await delivery.load_recipient(conn, user_id)
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as error:
        raise ServiceUnavailableException(
            "the database is not migrated: run `outbox migrate`"
        ) from error
    except DB_ERRORS as error:
        log.warning("test send: recipient lookup failed error=%s", type(error).__name__)
        raise ServiceUnavailableException("the database is unavailable") from error


async def _record(
    pool: AsyncConnectionPool[Any],
    params: dict[str, Any],
    user_id: str,
    effects: tuple[Effect, ...],
) -> None:
    """Log the attempt and apply the provider's effects.

    The send already happened, so database trouble here is logged, not answered.
    """
    try:
        async with pool.connection(timeout=DB_TIMEOUT) as conn, conn.transaction():
            await conn.execute(QUERIES["api_log_test_attempt"], params)
            for effect in effects:
                await delivery.write_effect(conn, user_id, effect)
    except DB_ERRORS as error:
        log.warning(
            "test send: attempt not logged id=%s error=%s",
            params["message_id"],
            type(error).__name__,
        )


async def _attempt(
    context: ApiContext, data: MessagingTestRequest, record: RecipientRecord, message_id: int
) -> Attempt:
    """Render (400 when it cannot be), then send: the dispatcher's delivery path."""
    try:
        # in a thread: up to 64 KiB of vars may take a noticeable time to render,
        # which the other requests (and /health) must not wait for
        envelope = await delivery.prepare(
            context.renderer,
            message_id=message_id,
            lane="transactional",
            channel=data.channel,
            user_id=data.user_id,
            template=data.template_name,
            vars=data.template_vars,
            vars_key=None,
            attempt=1,
            recipient=record,
            in_thread=True,
        )
    except TemplateRenderError as error:
        raise ClientException(str(error)) from error
    channel = context.channels.get(data.channel)
    if channel is None:
        failure = f"no {data.channel} channel is configured"
        return Attempt(
            outcome=TransientFailure(error_class="channel_unconfigured", error=failure),
            duration_ms=0.0,
        )
    return await delivery.send(channel, envelope, timeout=SEND_TIMEOUT)


def _errors(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description)


@post(
    "/messaging/test",
    guards=[owner_only, vars_depth_guard],
    security=[{SECURITY_SCHEME: []}],
    request_max_body_size=MAX_BODY_BYTES,
    status_code=200,
    operation_id="sendTestMessage",
    summary="Send a test message to a user now (owner only)",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    responses={
        400: _errors(
            "Unknown template, missing variables, vars nested too deep,"
            " or no address on the channel"
        ),
        401: _errors("No token, or a bad, expired or unsigned one"),
        403: _errors("The token's role is not owner"),
        404: _errors("No recipient with that user_id"),
        413: _errors("The body is over 64 KiB"),
        422: _errors("The body does not match the schema"),
        429: _errors("Too many calls by this caller; see Retry-After"),
        502: ResponseSpec(
            data_container=MessagingTestResult,
            description="The provider did not accept the message",
        ),
        503: _errors("The database is unavailable"),
    },
)
async def send_test_message(
    data: JSONBody[MessagingTestRequest], request: Request[Token, Token, Any]
) -> Response[MessagingTestResult]:
    """Render ``template_name`` with ``template_vars`` and send it to ``user_id`` now."""
    context: ApiContext = request.app.state["outbox"]
    if data.channel not in context.channels and data.channel not in CHANNELS:
        # as before channels were data: a name no channel answers to fails the schema
        raise HTTPException(
            status_code=422, detail=f"unknown channel {data.channel!r}: no such channel here"
        )
    if data.channel == "inapp":
        # the inbox is not a provider: a test item would sit in a real user's inbox
        raise ClientException("inapp has no provider to test; enqueue a message instead")
    try:
        context.catalog.validate(data.channel, data.template_name, data.template_vars)
    except InvalidMessage as error:
        raise ClientException(str(error)) from error
    record = await _load_recipient(context.pool, data.user_id)
    if record is None:
        raise NotFoundException(f"no recipient with user_id {data.user_id!r}")
    problem = address_problem(record, data.channel)
    if problem is not None:
        raise ClientException(problem)
    message_id = next_test_message_id()
    attempt = await _attempt(context, data, record, message_id)
    outcome = attempt.outcome
    duration_ms = round(attempt.duration_ms, 3)
    error_class, provider_error = failure_of(outcome)
    sent = isinstance(outcome, Sent)
    caller = request.user.sub if isinstance(request.user, Token) else "?"
    await _record(
        context.pool,
        {
            "message_id": message_id,
            "channel": data.channel,
            "user_id": data.user_id,
            "template": data.template_name,
            "outcome": "sent" if sent else "failed",
            "error_class": error_class,
            "error": clip_error(provider_error),
            "duration_ms": duration_ms,
            "caller": clip_error(f"api:{caller}"),
        },
        data.user_id,
        outcome.effects,
    )
    metrics = request.app.state.get("metrics")
    if metrics is not None:
        metrics.test_sends.labels(channel=data.channel, status="sent" if sent else "failed").inc()
    log.info(
        "test send id=%d channel=%s template=%s outcome=%s%s",
        message_id,
        data.channel,
        data.template_name,
        "sent" if sent else "failed",
        f" error_class={error_class}" if error_class else "",
    )
    result = MessagingTestResult(
        status="sent" if sent else "failed",
        message_id=message_id,
        delivery_time_ms=duration_ms,
        error=clip_error(provider_error),
    )
    return Response(result, status_code=200 if sent else 502)
