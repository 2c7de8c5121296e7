"""The in-app inbox in ``outbox demo``: a stop-loss alert lands in a trader's inbox.

A browser (here: a thread with httpx) holds ``GET /api/v1/inbox/stream`` open as the
trader, with a user token. The platform enqueues the alert on channel ``inapp`` with
``escalate_after`` in its own transaction; a replica delivers it by writing the inbox
item, the API hears the ``NOTIFY`` and the stream prints the item. Reading it through
``POST /api/v1/inbox/{id}/read`` acknowledges the alert, so it never escalates.

Every figure printed comes from the stream, the API or ``outbox.message_status``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import jwt
import psycopg

import outbox
from outbox.demo import _scenario

STREAM_WAIT_SECONDS = 20.0
"""How long the demo waits for the stream to open, then for the item to arrive."""

TRADER = _scenario.user_id(7)
ALERT_VARS = {
    "instrument": "XAUUSD",
    "side": "buy",
    "entry_price": "2384.10",
    "current_price": "2371.60",
    "loss_amount": "125.00",
    "broker_ticket": "T-INBOX-7",
}


@dataclass(frozen=True, kw_only=True)
class InboxReport:
    """What the inbox step saw."""

    user_id: str
    message_id: int
    item: dict[str, Any]
    stream_ms: float
    unread_before: int
    unread_after: int
    state_after_read: str


class InboxDemoError(RuntimeError):
    """The inbox step did not see what it expected (the message says what)."""


def user_token(secret: str, user_id: str) -> str:
    """A user's token for the demo API (a throwaway secret, valid one hour)."""
    claims = {"sub": user_id, "role": "user", "exp": int(time.time()) + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


class _Stream(threading.Thread):
    """Reads the user's inbox stream; puts ``"connected"``, then each item, on a queue."""

    def __init__(self, api: str, token: str) -> None:
        super().__init__(name="inbox-stream", daemon=True)
        self.api = api
        self.token = token
        self.events: queue.Queue[str | dict[str, Any] | Exception] = queue.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "GET",
                f"{self.api}/api/v1/inbox/stream",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=httpx.Timeout(5.0, read=STREAM_WAIT_SECONDS * 2),
            ) as answer:
                answer.raise_for_status()
                data: list[str] = []
                for line in answer.iter_lines():
                    if self.stop.is_set():
                        return
                    if line == ": connected":
                        self.events.put("connected")
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        self.events.put(json.loads("\n".join(data)))
                        data = []
        except Exception as error:  # reported by the waiting side, with its cause
            self.events.put(error)


def _next_event(stream: _Stream, what: str) -> str | dict[str, Any]:
    try:
        event = stream.events.get(timeout=STREAM_WAIT_SECONDS)
    except queue.Empty:
        waited = f"{STREAM_WAIT_SECONDS:.0f} s"
        raise InboxDemoError(f"no {what} on the inbox stream in {waited}") from None
    if isinstance(event, Exception):
        raise InboxDemoError(f"the inbox stream failed: {event}") from event
    return event


def show_inbox(url: str, api: str, secret: str, say: Callable[[str], None]) -> InboxReport:
    """Open the trader's stream, commit one in-app alert, print it, read it."""
    token = user_token(secret, TRADER)
    headers = {"Authorization": f"Bearer {token}"}
    stream = _Stream(api, token)
    stream.start()
    try:
        if _next_event(stream, "greeting") != "connected":
            raise InboxDemoError("the inbox stream did not open with ': connected'")
        say(f"{TRADER}'s browser opened GET /api/v1/inbox/stream (Server-Sent Events)")
        with psycopg.connect(url) as conn:
            message_id = outbox.enqueue(
                conn,
                user_id=TRADER,
                channel="inapp",
                template="position_failure_sl",
                vars=ALERT_VARS,
                escalate_after=timedelta(minutes=15),
            )
            conn.commit()
        committed = time.monotonic()
        event = _next_event(stream, "item")
        stream_ms = (time.monotonic() - committed) * 1000
        if not isinstance(event, dict) or event.get("message_id") != message_id:
            raise InboxDemoError(f"the stream sent {event!r}, not the item of #{message_id}")
        say(
            f"in-app alert #{message_id} committed; the stream printed item #{event['id']} "
            f"{stream_ms:.0f} ms later: {event['title']!r}"
        )
        with httpx.Client(base_url=api, headers=headers, timeout=10.0) as client:
            unread_before = int(client.get("/api/v1/inbox/unread-count").json()["unread"])
            read = client.post(f"/api/v1/inbox/{event['id']}/read")
            read.raise_for_status()
            unread_after = int(client.get("/api/v1/inbox/unread-count").json()["unread"])
        with psycopg.connect(url) as conn:
            status = outbox.message_status(conn, message_id)
        state = status.state if status is not None else "unknown"
        say(
            f"{TRADER} read it (POST /api/v1/inbox/{event['id']}/read): unread "
            f"{unread_before} -> {unread_after}, the alert is {state} and will not escalate"
        )
        return InboxReport(
            user_id=TRADER,
            message_id=message_id,
            item=event,
            stream_ms=stream_ms,
            unread_before=unread_before,
            unread_after=unread_after,
            state_after_read=str(state),
        )
    finally:
        stream.stop.set()
