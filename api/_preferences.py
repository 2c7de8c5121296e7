"""``GET`` and ``PUT /api/v1/preferences``: a user's topic preferences.

A preference says on which channels the user wants one topic (a template name),
optionally only for one instrument (``vars["instrument"]``); an empty list mutes
it (not allowed for ``position_failure_*``: a failed stop-loss must reach the
trader somewhere). ``GET`` answers the caller's, ``PUT`` replaces them all with the
body's, through :func:`outbox.set_preference` (its validation applies) in one
transaction: a body that fails anywhere changes nothing.

===  ============================================================================
200  ``[{topic, instrument, channels}]`` (``instrument`` null: the whole topic),
     sorted by topic and instrument; ``channels`` sorted, without repeats
400  an unknown channel, an unknown topic (neither a template nor one of the
     user's preferences), a position-failure topic muted, a topic and instrument
     given twice
413  the body is over 64 KiB; 422 it does not match the schema
===  ============================================================================
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, get, put
from litestar.exceptions import ClientException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from outbox import InvalidMessage, set_preference_async
from outbox._queries import QUERIES
from outbox.api._auth import user_of
from outbox.api._database import database
from outbox.api._testsend import ApiContext, ErrorBody
from outbox.api._user_routes import USER_ROUTE, nesting_guard, user_responses

MAX_PREFERENCES = 200
"""Preferences one user may hold: a PUT replaces them all, so this bounds the rows."""
MAX_BODY_BYTES = 64 * 1024
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('outbox.preference:' || %(user_id)s, 0))"
"""Two PUTs of one user take turns: each replaces the whole set, neither half of it."""

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
ChannelName = Annotated[str, msgspec.Meta(max_length=64)]
"""Which names are channels is outbox.set_preference's to say (400, not 422)."""


class Preference(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Deliver ``topic`` (only for ``instrument`` when given) on ``channels`` only."""

    topic: Name
    instrument: Name | None = None
    channels: Annotated[list[ChannelName], msgspec.Meta(max_length=16)]


async def _stored(conn: Any, user_id: str) -> list[Preference]:
    cursor = await conn.execute(QUERIES["api_preferences"], {"user_id": user_id})
    return [
        Preference(topic=topic, instrument=instrument or None, channels=list(channels))
        for topic, instrument, channels in await cursor.fetchall()
    ]


def _check_unique(wanted: list[Preference]) -> None:
    seen: set[tuple[str, str | None]] = set()
    for preference in wanted:
        key = (preference.topic, preference.instrument)
        if key in seen:
            where = f" for instrument {key[1]!r}" if key[1] else ""
            raise ClientException(f"topic {key[0]!r}{where} is given twice")
        seen.add(key)


@get(
    "/api/v1/preferences",
    **USER_ROUTE,
    operation_id="getPreferences",
    summary="The user's topic preferences",
    responses=user_responses(),
)
async def get_preferences(request: Request[Any, Any, Any]) -> list[Preference]:
    """Answer the caller's preferences."""
    user_id = user_of(request)
    async with database(request.app.state["outbox"], "preferences") as conn:
        return await _stored(conn, user_id)


@put(
    "/api/v1/preferences",
    guards=[*USER_ROUTE["guards"], nesting_guard(3)],  # list, preference, channels
    security=USER_ROUTE["security"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_id="putPreferences",
    summary="Replace the user's topic preferences",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    responses=user_responses(
        {
            400: ResponseSpec(
                data_container=ErrorBody,
                description="Unknown channel or topic, a muted position-failure topic,"
                " or a topic and instrument given twice",
            ),
            413: ResponseSpec(data_container=ErrorBody, description="The body is over 64 KiB"),
            422: ResponseSpec(
                data_container=ErrorBody, description="The body does not match the schema"
            ),
        }
    ),
)
async def put_preferences(
    data: JSONBody[list[Preference]], request: Request[Any, Any, Any]
) -> list[Preference]:
    """Replace the caller's preferences with ``data``; answer them as stored."""
    user_id = user_of(request)
    if len(data) > MAX_PREFERENCES:
        # Litestar drops constraints on the body's outer list: counted here (422 too)
        raise ValidationException(f"at most {MAX_PREFERENCES} preferences, not {len(data)}")
    _check_unique(data)
    context: ApiContext = request.app.state["outbox"]
    topics = set(context.catalog.names())
    async with database(context, "preferences") as conn, conn.transaction():
        await conn.execute(_LOCK, {"user_id": user_id})
        before = await _stored(conn, user_id)
        known = topics | {p.topic for p in before}
        unknown = sorted({p.topic for p in data} - known)
        if unknown:
            raise ClientException(f"unknown topic {unknown[0]!r}: topics are template names")
        wanted = {(p.topic, p.instrument) for p in data}
        try:
            for old in before:
                if (old.topic, old.instrument) not in wanted:
                    await set_preference_async(
                        conn, user_id, topic=old.topic, channels=None, instrument=old.instrument
                    )
            for new in data:
                await set_preference_async(
                    conn, user_id, topic=new.topic, channels=new.channels, instrument=new.instrument
                )
        except InvalidMessage as error:
            # raised inside the transaction: leaving the block rolls every change back
            raise ClientException(str(error)) from error
        return await _stored(conn, user_id)
