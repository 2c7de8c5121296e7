"""A user's browser push subscriptions: the key to subscribe with, subscribe, unsubscribe.

=======  =========================================================================
GET      ``/api/v1/push/vapid-public-key``: ``{key}``, the application server key
         for ``pushManager.subscribe`` (404 when push is not configured)
POST     ``/api/v1/push/subscriptions``, body ``PushSubscription.toJSON()``
         ``{endpoint, expirationTime?, keys: {p256dh, auth}}``: 201 ``{id, endpoint}``
         (stored, or refreshed when the user had it already)
DELETE   ``/api/v1/push/subscriptions``, body ``{endpoint}``: 204, or 404 when the
         user has no subscription there (none, or another user's)
=======  =========================================================================

A subscription is checked as the push channel checks it before every send
(:func:`~outbox.dispatcher.channels.push.subscription_refusal`: an ``https``
endpoint on a host in ``OUTBOX_PUSH_ALLOWED_HOSTS``, a P-256 ``p256dh``, a 16-byte
``auth``), then by :func:`outbox.add_push_subscription`: 400 when it fails, and
nothing is stored. An endpoint another user holds is theirs: 409, and it stays
theirs (the browser should unsubscribe and subscribe again, which gives it a new
endpoint). ``expirationTime`` is accepted and not stored: a push service that
ends a subscription answers 404 or 410, and the channel then deletes it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import ClientException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from outbox import (
    ConfigurationError,
    InvalidMessage,
    add_push_subscription_async,
    list_push_subscriptions_async,
    remove_push_subscription_async,
)
from outbox._queries import QUERIES
from outbox.api._auth import user_of
from outbox.api._database import database
from outbox.api._testsend import ApiContext, ErrorBody
from outbox.api._user_routes import USER_ROUTE, nesting_guard, user_responses
from outbox.dispatcher.channels.push import application_server_key, subscription_refusal

MAX_BODY_BYTES = 8 * 1024
MAX_SUBSCRIPTIONS = 20
"""Browsers one user may subscribe: each message goes to all of them."""
NOT_CONFIGURED = "push is not configured on this server"
NOT_FOUND = "push subscription not found"

Endpoint = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class SubscriptionKeys(msgspec.Struct, kw_only=True):
    """The browser's public key and auth secret, base64url."""

    p256dh: Key
    auth: Key


class BrowserSubscription(msgspec.Struct, kw_only=True):
    """What ``PushSubscription.toJSON()`` gives (fields added by browsers are ignored)."""

    endpoint: Endpoint
    keys: SubscriptionKeys
    expirationTime: float | None = None  # the browser's spelling


class Unsubscription(msgspec.Struct, kw_only=True):
    """Which of the user's subscriptions to delete."""

    endpoint: Endpoint


class Subscribed(msgspec.Struct, kw_only=True):
    """The stored subscription."""

    id: int
    endpoint: str


class VapidKey(msgspec.Struct, kw_only=True):
    """The application server key (base64url, unpadded)."""

    key: str


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description)


@get(
    "/api/v1/push/vapid-public-key",
    **USER_ROUTE,
    operation_id="getVapidPublicKey",
    summary="The application server key browsers subscribe with",
    responses=user_responses({404: _error("Push is not configured (no VAPID key)")}),
)
async def vapid_public_key(request: Request[Any, Any, Any]) -> VapidKey:
    """Answer ``OUTBOX_VAPID_PRIVATE_KEY``'s public key."""
    user_of(request)
    context: ApiContext = request.app.state["outbox"]
    try:
        key = application_server_key(context.settings)
    except ConfigurationError:  # the dispatcher refuses to start with it: nothing works
        key = None
    if key is None:
        raise NotFoundException(NOT_CONFIGURED)
    return VapidKey(key=key)


@post(
    "/api/v1/push/subscriptions",
    guards=[*USER_ROUTE["guards"], nesting_guard(2)],  # subscription, keys
    security=USER_ROUTE["security"],
    request_max_body_size=MAX_BODY_BYTES,
    status_code=201,
    operation_id="subscribePush",
    summary="Store the browser's push subscription for the user",
    responses=user_responses(
        {
            400: _error("An endpoint or keys the push channel would refuse"),
            409: _error("Another user holds this endpoint, or the user has too many"),
            413: _error("The body is over 8 KiB"),
            422: _error("The body does not match the schema"),
        }
    ),
)
async def subscribe(
    data: JSONBody[BrowserSubscription], request: Request[Any, Any, Any]
) -> Subscribed:
    """Store ``data`` as one of the caller's subscriptions."""
    user_id = user_of(request)
    context: ApiContext = request.app.state["outbox"]
    refusal = subscription_refusal(
        context.settings, data.endpoint, data.keys.p256dh, data.keys.auth
    )
    if refusal is not None:
        raise ClientException(refusal)
    info = {"endpoint": data.endpoint, "keys": {"p256dh": data.keys.p256dh, "auth": data.keys.auth}}
    async with database(context, "push subscribe") as conn, conn.transaction():
        params = {"endpoint": data.endpoint}
        held = await (await conn.execute(QUERIES["api_push_subscription_owner"], params)).fetchone()
        if held is not None and held[0] != user_id:
            raise _conflict(
                "this endpoint belongs to another subscription: unsubscribe it in the"
                " browser and subscribe again"
            )
        if held is None:
            mine = await list_push_subscriptions_async(conn, user_id)
            if len(mine) >= MAX_SUBSCRIPTIONS:
                raise _conflict(
                    f"at most {MAX_SUBSCRIPTIONS} push subscriptions per user: remove one first"
                )
        try:
            subscription_id = await add_push_subscription_async(conn, user_id, info)
        except InvalidMessage as error:
            raise ClientException(str(error)) from error
    return Subscribed(id=subscription_id, endpoint=data.endpoint)


def _conflict(detail: str) -> ClientException:
    return ClientException(detail, status_code=409)


@delete(
    "/api/v1/push/subscriptions",
    guards=[*USER_ROUTE["guards"], nesting_guard(1)],
    security=USER_ROUTE["security"],
    request_max_body_size=MAX_BODY_BYTES,
    status_code=204,
    operation_id="unsubscribePush",
    summary="Delete one of the user's push subscriptions",
    responses=user_responses(
        {
            400: _error("An endpoint no subscription could have (a NUL character, say)"),
            404: _error("The user has no subscription with this endpoint"),
            413: _error("The body is over 8 KiB"),
            422: _error("The body does not match the schema"),
        }
    ),
)
async def unsubscribe(
    data: JSONBody[Unsubscription], request: Request[Any, Any, Any]
) -> Response[None]:
    """Delete the caller's subscription of ``data.endpoint``."""
    user_id = user_of(request)
    async with database(request.app.state["outbox"], "push unsubscribe") as conn:
        try:
            removed = await remove_push_subscription_async(conn, user_id, data.endpoint)
        except InvalidMessage as error:  # a NUL, say: text PostgreSQL cannot hold
            raise ClientException(str(error)) from error
    if not removed:
        raise NotFoundException(NOT_FOUND)
    return Response(None, status_code=204)
