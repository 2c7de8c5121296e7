"""Write messages inside the caller's transaction.

The contract, repeated in every public docstring: rows go through the caller's
connection or session; outbox never begins, commits, rolls back or flushes the
caller's transaction. Every argument is checked in Python *before* a statement is
sent, so an :class:`~outbox.InvalidMessage` leaves the transaction usable and
nothing written. Rollback means no message; commit means delivery, at least once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._errors import InvalidMessage
from outbox._templates import default_catalog
from outbox.vocabulary import CHANNEL_NAME, CHANNELS, LANES, PRIORITY_RANGES

MAX_VARS_BYTES = 256 * 1024
"""Bytes of vars as JSON text (UTF-8) a message may carry; also the dispatcher's
limit on the stored vars it receives."""
MAX_VARS_DEPTH = 32
"""Levels of nesting vars may have: the vars object is level 1, every object or
array inside adds one, scalars add none. Deeper documents are refused everywhere
(enqueue, the SQL function, the dispatcher, the API), before anything recurses."""
MAX_ID_LENGTH = 255
DEFAULT_DEDUP_WINDOW = timedelta(hours=24)
# The database's rules too (outbox.enqueue): a window is fixed by its key's first use.
MIN_DEDUP_WINDOW = timedelta(seconds=1)
MAX_DEDUP_WINDOW = timedelta(days=30)
# A send_at further ahead is a bug (a wrong year, a sentinel date), not a plan.
MAX_SEND_AHEAD = timedelta(days=365)
MAX_ESCALATE_AFTER = timedelta(days=7)
"""An alert nobody acknowledged for a week is not waiting for an acknowledgement."""
_CONTAINERS = (dict, list, tuple)
"""What ``json.dumps`` writes as an object or an array (subclasses included)."""
_TEMPLATE_NAME = re.compile(r"^[a-z0-9_]{1,100}$")


@dataclass(frozen=True, kw_only=True)
class MessageSpec:
    """A validated enqueue request, ready to be bound to the ``enqueue`` statement."""

    channel: str
    template: str
    user_id: str
    vars_json: str
    lane: str
    idempotency_key: str | None
    send_at: datetime | None
    priority: int | None
    fallback: tuple[str, ...] | None
    dedup_window: timedelta
    expires_at: datetime | None = None
    collapse_key: str | None = None
    escalate_after: timedelta | None = None

    def params(self) -> dict[str, Any]:
        """Parameters of the ``enqueue`` statement in ``sql/queries.sql``."""
        return {
            "channel": self.channel,
            "template": self.template,
            "user_id": self.user_id,
            "vars": self.vars_json,
            "lane": self.lane,
            "idempotency_key": self.idempotency_key,
            "send_at": self.send_at,
            "priority": self.priority,
            "fallback": list(self.fallback) if self.fallback is not None else None,
            "dedup_window": self.dedup_window,
            "expires_at": self.expires_at,
            "collapse_key": self.collapse_key,
            "escalate_after": self.escalate_after,
        }


def check_text(name: str, value: object, *, max_length: int = MAX_ID_LENGTH) -> str:
    """Return ``value`` if it is a non-empty string PostgreSQL can store, else raise."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidMessage(f"{name} must not be empty")
    if len(value) > max_length:
        raise InvalidMessage(f"{name} is {len(value)} characters long; the limit is {max_length}")
    if "\x00" in value:
        raise InvalidMessage(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def check_channel(channel: object) -> str:
    """Return ``channel`` if it can be a channel's name, else raise.

    Which channels exist is the database's word (``outbox.channel``, where plugins
    register theirs): the SQL functions refuse an unknown one.
    """
    if not isinstance(channel, str) or not CHANNEL_NAME.match(channel):
        raise InvalidMessage(
            f"unknown channel {channel!r}; a channel name is 1-32 characters of a-z, 0-9"
            f" and _ (built-in: {', '.join(CHANNELS)})"
        )
    return channel


def check_channel_has_templates(channel: str) -> None:
    """Refuse a channel that is neither built in nor has a template folder here: it
    is a typo far more often than a plugin's channel missing its templates (the
    database refuses channels it does not list either way).
    """
    if channel not in CHANNELS and channel not in default_catalog().channels():
        raise InvalidMessage(
            f"unknown channel {channel!r}: not a built-in one ({', '.join(CHANNELS)}) and"
            f" no template folder {channel}/ (a plugin's channel renders"
            f" {channel}/<template>.txt.j2 from OUTBOX_TEMPLATES_DIR)"
        )


def check_lane(lane: object) -> str:
    """Return ``lane`` if it names a known lane, else raise."""
    if lane not in LANES:
        raise InvalidMessage(f"unknown lane {lane!r}; expected one of {', '.join(LANES)}")
    return str(lane)


def check_template_name(template: object) -> str:
    """Return ``template`` if it is a well-formed template name, else raise."""
    if not isinstance(template, str) or not _TEMPLATE_NAME.match(template):
        raise InvalidMessage(
            f"template name {template!r} must be 1-100 characters of a-z, 0-9 and _"
        )
    return template


def vars_depth_exceeds(vars: Mapping[str, Any], limit: int = MAX_VARS_DEPTH) -> bool:
    """Whether ``vars`` nest deeper than ``limit`` levels (see :data:`MAX_VARS_DEPTH`).

    Walks one level at a time, without recursion, so a document nested 100,000
    levels deep costs a loop, not the stack. Objects are mappings, arrays are lists
    and tuples (what ``json.dumps`` writes as such). A container met twice on one
    level is walked once: shared references cannot make the walk exponential, and a
    cycle is infinitely deep, so it is refused like any too-deep document.
    """
    # most vars are flat: one pass over the values, no bookkeeping
    level: list[Any] = [value for value in vars.values() if isinstance(value, _CONTAINERS)]
    depth = 2
    while level:
        if depth > limit:
            return True
        nested: list[Any] = []
        seen: set[int] = set()
        for container in level:
            values = container.values() if isinstance(container, dict) else container
            for value in values:
                if isinstance(value, _CONTAINERS) and id(value) not in seen:
                    seen.add(id(value))
                    nested.append(value)
        level = nested
        depth += 1
    return False


def check_vars_depth(vars: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidMessage` when ``vars`` nest deeper than :data:`MAX_VARS_DEPTH`."""
    if vars_depth_exceeds(vars):
        raise InvalidMessage(
            f"vars nest deeper than {MAX_VARS_DEPTH} levels (the vars object is level 1;"
            " every object or array inside adds one)"
        )


def encode_vars(vars: object) -> str:
    """Serialise template variables to JSON text that PostgreSQL's jsonb accepts."""
    if not isinstance(vars, Mapping):
        raise InvalidMessage(f"vars must be a mapping, not {type(vars).__name__}")
    check_vars_depth(vars)  # before json.dumps, which recurses
    for key in vars:
        if not isinstance(key, str):
            raise InvalidMessage(f"vars keys must be strings, not {type(key).__name__}")
    try:
        text = json.dumps(vars, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise InvalidMessage(f"vars are not JSON-serialisable: {error}") from None
    if "\\u0000" in text:
        raise InvalidMessage("vars contain a NUL character, which PostgreSQL cannot store")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessage("vars contain invalid Unicode (a lone surrogate)") from None
    if size > MAX_VARS_BYTES:
        raise InvalidMessage(f"vars are {size} bytes as JSON; the limit is {MAX_VARS_BYTES}")
    return text


def check_priority(lane: str, priority: object) -> int | None:
    """Return ``priority`` if it lies within the lane's range, else raise."""
    if priority is None:
        return None
    allowed = PRIORITY_RANGES[lane]
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in allowed:
        raise InvalidMessage(
            f"priority {priority!r} is outside the {lane} lane's range "
            f"{allowed.start}..{allowed.stop - 1}"
        )
    return priority


def check_send_at(send_at: object) -> datetime | None:
    """Return ``send_at`` if it is a timezone-aware datetime at most 365 days ahead
    (or None), else raise. A time in the past means now.
    """
    if send_at is None:
        return None
    if not isinstance(send_at, datetime):
        raise InvalidMessage(f"send_at must be a datetime, not {type(send_at).__name__}")
    if send_at.tzinfo is None or send_at.utcoffset() is None:
        raise InvalidMessage("send_at must be timezone-aware (e.g. datetime.now(UTC))")
    if send_at - datetime.now(UTC) > MAX_SEND_AHEAD:
        raise InvalidMessage(
            f"send_at {send_at.isoformat()} is more than {MAX_SEND_AHEAD.days} days ahead"
        )
    return send_at


def check_dedup_window(dedup_window: object) -> timedelta:
    """Return ``dedup_window`` if it is a timedelta from 1 second to 30 days, else raise."""
    if not isinstance(dedup_window, timedelta):
        raise InvalidMessage(f"dedup_window must be a timedelta, not {type(dedup_window).__name__}")
    if not MIN_DEDUP_WINDOW <= dedup_window <= MAX_DEDUP_WINDOW:
        raise InvalidMessage(
            f"dedup_window {dedup_window} must be between 1 second and {MAX_DEDUP_WINDOW.days} days"
        )
    return dedup_window


def check_expires_at(expires_at: object, send_at: datetime | None) -> datetime | None:
    """Return ``expires_at`` if it is a timezone-aware datetime in the future and after
    ``send_at`` (or None), else raise.
    """
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime):
        raise InvalidMessage(f"expires_at must be a datetime, not {type(expires_at).__name__}")
    if expires_at.tzinfo is None or expires_at.utcoffset() is None:
        raise InvalidMessage("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    if expires_at <= datetime.now(UTC):
        raise InvalidMessage(f"expires_at {expires_at.isoformat()} is not in the future")
    if send_at is not None and expires_at <= send_at:
        raise InvalidMessage(
            f"expires_at {expires_at.isoformat()} is not after send_at {send_at.isoformat()}"
        )
    return expires_at


def check_escalate_after(escalate_after: object) -> timedelta | None:
    """Return ``escalate_after`` (seconds as a number, or a timedelta) as a timedelta
    from 1 second to 7 days (or None), else raise.
    """
    if escalate_after is None:
        return None
    if isinstance(escalate_after, bool) or not isinstance(escalate_after, int | float | timedelta):
        raise InvalidMessage(
            "escalate_after must be seconds (a number) or a timedelta, "
            f"not {type(escalate_after).__name__}"
        )
    if isinstance(escalate_after, timedelta):
        delay = escalate_after
    else:
        if escalate_after != escalate_after or escalate_after in (float("inf"), float("-inf")):
            raise InvalidMessage("escalate_after must be a finite number of seconds")
        delay = timedelta(seconds=escalate_after)
    if not timedelta(seconds=1) <= delay <= MAX_ESCALATE_AFTER:
        raise InvalidMessage(
            f"escalate_after {delay.total_seconds():g} s must be between 1 second and "
            f"{MAX_ESCALATE_AFTER.days} days"
        )
    return delay


def check_fallback(fallback: object, channel: str) -> tuple[str, ...] | None:
    """Return the fallback channels as a tuple (or None for the user's default order)."""
    if fallback is None:
        return None
    if isinstance(fallback, str) or not isinstance(fallback, Sequence):
        raise InvalidMessage("fallback must be a list of channel names")
    result = tuple(check_channel(item) for item in fallback)
    if channel in result:
        raise InvalidMessage(f"fallback must not repeat the message's own channel {channel!r}")
    if len(set(result)) != len(result):
        raise InvalidMessage("fallback lists a channel twice")
    return result


def build_message(
    *,
    user_id: object,
    channel: object,
    template: object,
    vars: object,
    lane: object = "transactional",
    idempotency_key: object = None,
    send_at: object = None,
    fallback: object = None,
    priority: object = None,
    dedup_window: object = DEFAULT_DEDUP_WINDOW,
    validate_template: bool = True,
    expires_at: object = None,
    collapse_key: object = None,
    escalate_after: object = None,
) -> MessageSpec:
    """Validate one enqueue request; raise :class:`InvalidMessage` on any problem."""
    checked_channel = check_channel(channel)
    checked_lane = check_lane(lane)
    checked_user = check_text("user_id", user_id)
    checked_template = check_template_name(template)
    vars_json = encode_vars(vars)
    key = None if idempotency_key is None else check_text("idempotency_key", idempotency_key)
    checked_send_at = check_send_at(send_at)
    collapse = None if collapse_key is None else check_text("collapse_key", collapse_key)
    checked_fallback = check_fallback(fallback, checked_channel)
    if validate_template:
        assert isinstance(vars, Mapping)
        for name in (checked_channel, *(checked_fallback or ())):
            check_channel_has_templates(name)
        default_catalog().validate(checked_channel, checked_template, vars)
    return MessageSpec(
        channel=checked_channel,
        template=checked_template,
        user_id=checked_user,
        vars_json=vars_json,
        lane=checked_lane,
        idempotency_key=key,
        send_at=checked_send_at,
        priority=check_priority(checked_lane, priority),
        fallback=checked_fallback,
        dedup_window=check_dedup_window(dedup_window),
        expires_at=check_expires_at(expires_at, checked_send_at),
        collapse_key=collapse,
        escalate_after=check_escalate_after(escalate_after),
    )


def enqueue(
    conn: Any,
    *,
    user_id: str,
    channel: str,
    template: str,
    vars: Mapping[str, Any],
    lane: str = "transactional",
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    fallback: Sequence[str] | None = None,
    priority: int | None = None,
    expires_at: datetime | None = None,
    collapse_key: str | None = None,
    escalate_after: float | timedelta | None = None,
) -> int:
    """Write one message in the caller's transaction and return its id.

    ``conn`` is a psycopg ``Connection`` or a SQLAlchemy ``Session`` or
    ``Connection``. The message exists if and only if the caller's transaction
    commits; outbox never begins, commits, rolls back or flushes it.

    A repeated ``idempotency_key`` within 24 hours of its first use (delivered
    messages included) writes nothing and returns the first message's id; the
    window is fixed by that first use. ``fallback`` lists the
    channels to try, in order, if this one cannot reach the user (default: the
    user's preferred order). ``priority`` orders messages within the lane (lower
    is sooner; transactional 0-99, campaign 100-199).

    ``expires_at``: a message not sent by then is never sent (outcome ``expired``,
    not a dead letter). ``collapse_key``: this message withdraws the user's pending,
    never-sent messages of the same key enqueued by the same database role (outcome
    ``superseded``). ``escalate_after`` (seconds or a timedelta, 1 s to 7 days)
    makes it an alert: once sent it waits that long for :func:`outbox.acknowledge`
    (or its ``ack_url``), then goes to the next channel of its chain, and so on.

    Raises :class:`~outbox.InvalidMessage` (unknown channel, lane or template,
    missing template variables, vars that are not JSON, an empty user id) before
    anything is sent to the database, so the transaction stays usable.
    """
    spec = build_message(
        user_id=user_id,
        channel=channel,
        template=template,
        vars=vars,
        lane=lane,
        idempotency_key=idempotency_key,
        send_at=send_at,
        fallback=fallback,
        priority=priority,
        expires_at=expires_at,
        collapse_key=collapse_key,
        escalate_after=escalate_after,
    )
    row = fetch_one(conn, "enqueue", spec.params())
    assert row is not None
    return int(row[0])


async def enqueue_async(
    conn: Any,
    *,
    user_id: str,
    channel: str,
    template: str,
    vars: Mapping[str, Any],
    lane: str = "transactional",
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    fallback: Sequence[str] | None = None,
    priority: int | None = None,
    expires_at: datetime | None = None,
    collapse_key: str | None = None,
    escalate_after: float | timedelta | None = None,
) -> int:
    """Asynchronous :func:`enqueue` for psycopg ``AsyncConnection`` and SQLAlchemy
    ``AsyncSession`` or ``AsyncConnection``; same contract, same SQL.
    """
    spec = build_message(
        user_id=user_id,
        channel=channel,
        template=template,
        vars=vars,
        lane=lane,
        idempotency_key=idempotency_key,
        send_at=send_at,
        fallback=fallback,
        priority=priority,
        expires_at=expires_at,
        collapse_key=collapse_key,
        escalate_after=escalate_after,
    )
    row = await fetch_one_async(conn, "enqueue", spec.params())
    assert row is not None
    return int(row[0])
