"""The Litestar application: ``create_app(settings)``.

Routes: ``POST /api/v1/messaging/test`` (owner test sends, see ``_testsend``),
``GET /api/v1/messages/{id}`` (a message's status, ``_message_status``),
``GET /ack/{token}`` (acknowledgement links, no login, ``_ack_link``), the providers'
signed webhooks ``POST /api/v1/webhooks/sms`` (Twilio status callbacks,
``_sms_status_callback``) and ``POST /api/v1/webhooks/email/mailgun`` (bounces and
complaints, ``_email_bounce_webhook``), ``GET /static/<name>``
(the browser client, no login, ``_static``), ``GET /health``,
``GET /metrics`` (Prometheus text), the OpenAPI document at ``/schema/openapi.json``
and its docs page at ``/schema``.

Lifetime: at startup the app opens one psycopg pool (without waiting for the
database, so the API starts and ``/health`` can say 503 while PostgreSQL is down)
and builds the channels, unless the caller injected its own; at shutdown it closes
the pool and the channels it built. Injected channels belong to the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import psycopg
from litestar import Litestar, Request, Response, Router, get
from litestar.exceptions import TooManyRequestsException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from outbox._db import (
    RECONNECT_TIMEOUT,
    connect_kwargs,
    deadline_connection_class,
    reconnect_afresh,
)
from outbox._schema_check import schema_problem_async
from outbox._settings import Settings
from outbox._templates import TemplateCatalog
from outbox.api._ack_link import acknowledge_by_link
from outbox.api._auth import FailedAuthLimit, jwt_auth, rate_limit
from outbox.api._email_bounce_webhook import TokenMemory, mailgun_email_event
from outbox.api._inbox import list_inbox, read_all, read_item, unread_count
from outbox.api._inbox_fanout import InboxFanout
from outbox.api._inbox_stream import DEFAULT_HEARTBEAT, inbox_stream
from outbox.api._message_status import read_message_status
from outbox.api._metrics import ApiMetrics
from outbox.api._preferences import get_preferences, put_preferences
from outbox.api._push_subscriptions import subscribe, unsubscribe, vapid_public_key
from outbox.api._sms_status_callback import sms_status_callback
from outbox.api._static import static_files_handler
from outbox.api._testsend import DB_ERRORS, ApiContext, send_test_message
from outbox.dispatcher.channels.base import Channel
from outbox.dispatcher.rendering import RenderCache

log = logging.getLogger("outbox.api")

HEALTH_TIMEOUT = 2.0
"""Seconds ``/health`` waits for the database before answering 503."""
DEFAULT_RATE_LIMIT = 10
"""Test sends per caller and minute."""


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``/health``: the API answers; whether the database does too, migrated to head."""

    status: str
    database: str
    detail: str | None = None


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("SET statement_timeout = '5s'")
    await conn.execute("SET application_name = 'outbox-api'")


def _pool(settings: Settings) -> AsyncConnectionPool[Any]:
    return AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"autocommit": True, **connect_kwargs(settings), "connect_timeout": 2},
        configure=_configure,
        check=AsyncConnectionPool.check_connection,
        reconnect_timeout=RECONNECT_TIMEOUT,
        reconnect_failed=reconnect_afresh,
        connection_class=deadline_connection_class(settings.db_timeout),
    )


@get(
    "/health",
    exclude_from_auth=True,
    summary="Readiness: the database answers and is migrated to head",
    responses={
        503: ResponseSpec(
            data_container=Health, description="PostgreSQL does not answer or is not migrated"
        )
    },
)
async def health(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 ``{"status": "ok", "database": "ok"}``; 503 when PostgreSQL does not answer
    (``database: "unreachable"``) or lacks the schema at head (``"not_migrated"``).
    """
    context: ApiContext = request.app.state["outbox"]
    # The check runs as its own task: a silent (half-open) connection cannot hold the
    # answer beyond HEALTH_TIMEOUT; the task finishes (or fails) in the background.
    check: asyncio.Task[str | None] = asyncio.create_task(_ping(context.pool))
    done, _ = await asyncio.wait({check}, timeout=HEALTH_TIMEOUT + 0.5)
    error: BaseException | None
    if done:
        error = check.exception()
    else:
        check.cancel()
        _pending_checks.add(check)
        check.add_done_callback(_forget_check)
        error = TimeoutError("no answer in time")
    if error is not None:
        if not isinstance(error, DB_ERRORS):
            raise error
        log.warning("health: database unavailable error=%s", type(error).__name__)
        return Response(Health(status="unavailable", database="unreachable"), status_code=503)
    problem = check.result()
    if problem is not None:
        return Response(
            Health(status="unavailable", database="not_migrated", detail=problem),
            status_code=503,
        )
    return Response(Health(status="ok", database="ok"))


@get("/livez", exclude_from_auth=True, summary="Liveness: the process serves requests")
async def livez() -> dict[str, str]:
    """200 while the process answers; it never looks at the database (that is /health)."""
    return {"status": "ok"}


_pending_checks: set[asyncio.Task[str | None]] = set()


async def _ping(pool: AsyncConnectionPool[Any]) -> str | None:
    """None when the database answers at head, else what is wrong with its schema."""
    async with pool.connection(timeout=HEALTH_TIMEOUT) as conn:
        return await schema_problem_async(conn)


def _not_migrated(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """A statement met a missing table or function: say what to do, not 500."""
    detail = "the database is not migrated: run `outbox migrate`"
    return Response({"status_code": 503, "detail": detail}, status_code=503)


def _forget_check(task: asyncio.Task[str | None]) -> None:
    _pending_checks.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late failure is expected, not worth a warning


@get(
    "/metrics",
    exclude_from_auth=True,
    # Litestar appends "; charset=utf-8" to text types itself: CONTENT_TYPE_LATEST
    # already has one, and Prometheus 3 refuses a duplicate parameter.
    media_type=CONTENT_TYPE_LATEST.replace("; charset=utf-8", ""),
    summary="Prometheus metrics (database gauges read at scrape time)",
)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    """Render the API's registry in Prometheus text format."""
    context: ApiContext = request.app.state["outbox"]
    api_metrics: ApiMetrics = request.app.state["metrics"]
    await api_metrics.queue.refresh(context.pool)
    return generate_latest(api_metrics.registry)


def _unprocessable(request: Request[Any, Any, Any], error: ValidationException) -> Response[Any]:
    """Answer schema violations with 422 (Litestar's default is 400)."""
    body: dict[str, Any] = {"status_code": 422, "detail": error.detail}
    if error.extra:
        body["extra"] = error.extra
    return Response(body, status_code=422)


def _too_many(request: Request[Any, Any, Any], error: TooManyRequestsException) -> Response[Any]:
    """429 with ``Retry-After`` (seconds until the caller's window frees a call)."""
    headers = dict(error.headers or {})
    reset = headers.get("RateLimit-Reset", "60")
    headers["Retry-After"] = str(max(1, int(reset))) if reset.lstrip("-").isdigit() else "60"
    body = {"status_code": 429, "detail": error.detail}
    return Response(body, status_code=429, headers=headers)


def create_app(
    settings: Settings,
    *,
    channels: Mapping[str, Channel] | None = None,
    channel_factory: Callable[[Settings], Mapping[str, Channel]] | None = None,
    catalog: TemplateCatalog | None = None,
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT,
    stream_heartbeat: float = DEFAULT_HEARTBEAT,
) -> Litestar:
    """Build the API for ``settings``.

    ``channels`` replaces the channels built from settings, and the app does not
    close them (their owner does). ``channel_factory(settings)`` is called at
    startup instead of :func:`~outbox.dispatcher.channels.build_channels`, in the app's
    event loop, and the app closes what it returns at shutdown. ``stream_heartbeat``:
    seconds between the comment lines that keep an idle inbox stream open. Raises
    :class:`~outbox.ConfigurationError` when ``OUTBOX_API_JWT_SECRET`` is empty.
    """
    auth = jwt_auth(
        settings.api_jwt_secret.reveal(),
        audience=settings.api_jwt_audience,
        issuer=settings.api_jwt_issuer,
    )
    failed_auth = FailedAuthLimit(settings.api_auth_failures_per_minute)
    # Links that do not verify have a budget of their own, which the link handler keeps:
    # a burst of stale links (a mail scanner, an old forwarded alert) from behind one
    # proxy must not lock the owner's API and /health out, nor the other way round.
    ack_link_failures = FailedAuthLimit(settings.api_auth_failures_per_minute)
    api_metrics = ApiMetrics.create()
    templates = catalog or TemplateCatalog(settings.templates_dir)

    lifespan = _lifespan(settings, templates, api_metrics, channels, channel_factory)

    messaging = Router(
        path="/api/v1",
        route_handlers=[send_test_message],
        middleware=[rate_limit(rate_limit_per_minute).middleware],
    )
    app = Litestar(
        route_handlers=[
            messaging,
            read_message_status,
            acknowledge_by_link,
            static_files_handler(),
            list_inbox,
            read_item,
            read_all,
            unread_count,
            inbox_stream,
            get_preferences,
            put_preferences,
            vapid_public_key,
            subscribe,
            unsubscribe,
            sms_status_callback,
            mailgun_email_event,
            health,
            livez,
            metrics,
        ],
        lifespan=[lifespan],
        # JWTAuth.on_app_init would also mark /health and /metrics as secured in the
        # schema; the middleware and the scheme are wired here, the requirement is
        # declared on the one secured route.
        middleware=[failed_auth.middleware, auth.middleware],
        exception_handlers={
            ValidationException: _unprocessable,
            TooManyRequestsException: _too_many,
            psycopg.errors.UndefinedTable: _not_migrated,
            psycopg.errors.UndefinedFunction: _not_migrated,
            psycopg.errors.InvalidSchemaName: _not_migrated,
        },
        openapi_config=OpenAPIConfig(
            title="outbox API",
            version=_version(),
            description=(
                "Owner test sends and message status, acknowledgement links,"
                " health and metrics of the outbox."
            ),
            path="/schema",
            components=[auth.openapi_components],
            render_plugins=[SwaggerRenderPlugin()],
        ),
        debug=False,
    )
    # set on the built app: Litestar(state=...) would deep-copy the limiter
    app.state["ack_link_failures"] = ack_link_failures
    app.state["inbox_stream_heartbeat"] = stream_heartbeat
    app.state["mailgun_tokens"] = TokenMemory()
    return app


def _lifespan(
    settings: Settings,
    templates: TemplateCatalog,
    api_metrics: ApiMetrics,
    channels: Mapping[str, Channel] | None,
    channel_factory: Callable[[Settings], Mapping[str, Channel]] | None,
) -> Callable[[Litestar], Any]:
    """Open the pool and the channels at startup; close what the app owns at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = _pool(settings)
        await pool.open(wait=False)
        owned: Mapping[str, Channel] = {}
        if channels is None:
            from outbox.dispatcher.channels import build_channels

            owned = (channel_factory or build_channels)(settings)
        app.state["outbox"] = ApiContext(
            settings=settings,
            catalog=templates,
            renderer=RenderCache(
                templates,
                platform_base_url=settings.platform_base_url,
                sms_max_segments=settings.sms_max_segments,
            ),
            channels=channels if channels is not None else owned,
            pool=pool,
        )
        app.state["metrics"] = api_metrics
        # LISTEN needs a session of its own: the direct URL when the pool goes
        # through a transaction-pooling PgBouncer
        fanout = InboxFanout(settings.listen_database_url or settings.database_url, pool)
        await fanout.start()
        app.state["inbox_fanout"] = fanout
        try:
            yield
        finally:
            await fanout.close()
            for channel in owned.values():
                try:
                    await channel.aclose()
                except Exception:  # closing one must not keep the others open
                    log.exception("channel close failed channel=%s", channel.name)
            await pool.close()

    return lifespan


def _version() -> str:
    from outbox import __version__

    return __version__
