"""Acknowledgement links and the owner's message status, against real PostgreSQL.

Alerts are arranged in the state the dispatcher leaves them in after their first
delivery (``awaiting_ack``, ``sent_at`` set, a ``sent`` attempt logged), so these
tests need the schema of outbox_0008 and not the dispatcher.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from outbox._settings import Secret, Settings
from outbox.api import create_app

SECRET = "api-jwt-secret-for-the-alert-tests-0123456789"
PUBLIC_URL = "https://alerts.example.com"
INVALID = {"detail": "invalid or expired acknowledgement link"}
VARS = {
    "instrument": "EURUSD",
    "trigger_price": "1.1",
    "current_price": "1.2",
    "condition": "above",
}


def owner(role: str = "owner") -> dict[str, str]:
    claims = {"sub": "owner-1", "role": role, "exp": int(time.time()) + 300}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        api_jwt_secret=Secret(SECRET),
        api_public_url=PUBLIC_URL,
        api_auth_failures_per_minute=1000,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings, channels={})) as client:
        yield client


def enqueue_alert(admin: psycopg.Connection[Any], user_id: str = "u1") -> int:
    row = admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', %s, %s::jsonb,"
        " escalate_after => interval '5 minutes')",
        [user_id, json.dumps(VARS)],
    ).fetchone()
    assert row is not None
    return int(row[0])


def deliver(admin: psycopg.Connection[Any], message_id: int, *, seconds_ago: float = 90) -> None:
    """What the dispatcher's first delivery of an alert leaves behind."""
    admin.execute(
        "UPDATE outbox.message SET status = 'awaiting_ack', attempts = 0,"
        " sent_at = now() - make_interval(secs => %s),"
        " next_attempt_at = now() + escalate_after"
        " WHERE id = %s",
        [seconds_ago, message_id],
    )
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome, duration_ms, enqueued_by)"
        " SELECT id, lane, channel, user_id, template, 1, 'sent', 12.5, enqueued_by"
        " FROM outbox.message WHERE id = %s",
        [message_id],
    )


@pytest.fixture
def alert(admin: psycopg.Connection[Any]) -> int:
    """An alert sent 90 seconds ago, waiting for its acknowledgement."""
    message_id = enqueue_alert(admin)
    deliver(admin, message_id)
    return message_id


def link_path(settings: Settings, message_id: int, **kwargs: Any) -> str:
    url = settings.ack_url(message_id, **kwargs)
    assert url is not None and url.startswith(f"{PUBLIC_URL}/ack/")
    return url.removeprefix(PUBLIC_URL)


def snapshot(admin: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every message row and every attempt row: what a refused link must not change."""
    messages = admin.execute(
        "SELECT id, status, sent_at, acknowledged_at, next_attempt_at, attempts"
        " FROM outbox.message ORDER BY id"
    ).fetchall()
    attempts = admin.execute(
        "SELECT id, message_id, outcome FROM outbox.attempt ORDER BY id"
    ).fetchall()
    return messages, attempts


def outcomes(admin: psycopg.Connection[Any], message_id: int) -> list[str]:
    rows = admin.execute(
        "SELECT outcome FROM outbox.attempt WHERE message_id = %s ORDER BY id", [message_id]
    ).fetchall()
    return [outcome for (outcome,) in rows]


def sample(metrics_text: str, name: str) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "} " in line):
            head, value = line.rsplit(" ", 1)
            if head == name:
                return float(value)
    return None


# ------------------------------------------------------------------ the link works


async def test_a_valid_link_acknowledges_the_alert(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
) -> None:
    response = await client.get(link_path(settings, alert))

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "acknowledged", "message_id": alert}
    assert response.headers["cache-control"] == "no-store"
    # the row is gone (the escalation with it), the acknowledgement is in the log
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE id = %s", [alert]
    ).fetchone() == (0,)
    assert outcomes(admin, alert) == ["sent", "acknowledged"]
    assert admin.execute("SELECT outbox.message_status(%s)", [alert]).fetchone() == (
        "acknowledged",
    )


async def test_a_second_click_still_answers_acknowledged_and_changes_nothing(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
) -> None:
    path = link_path(settings, alert)
    first = await client.get(path)
    after_first = snapshot(admin)

    second = await client.get(path)

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json() == first.json() == {"status": "acknowledged", "message_id": alert}
    assert snapshot(admin) == after_first
    assert outcomes(admin, alert) == ["sent", "acknowledged"]


async def test_an_acknowledgement_is_counted_once_with_its_time_from_the_first_delivery(
    client: AsyncTestClient[Litestar], settings: Settings, alert: int
) -> None:
    before = (await client.get("/metrics")).text
    assert sample(before, 'outbox_acknowledgements_total{via="link"}') == 0.0

    for _ in range(2):
        assert (await client.get(link_path(settings, alert))).status_code == 200
    text = (await client.get("/metrics")).text

    assert sample(text, 'outbox_acknowledgements_total{via="link"}') == 1.0
    assert sample(text, "outbox_time_to_acknowledge_seconds_count") == 1.0
    # sent 90 seconds before the click: between the 60 s and the 120 s buckets
    assert sample(text, 'outbox_time_to_acknowledge_seconds_bucket{le="60.0"}') == 0.0
    assert sample(text, 'outbox_time_to_acknowledge_seconds_bucket{le="120.0"}') == 1.0
    observed = sample(text, "outbox_time_to_acknowledge_seconds_sum")
    assert observed is not None and 90 <= observed < 110


async def test_an_alert_in_flight_is_marked_and_a_second_click_is_still_acknowledged(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
) -> None:
    """The escalation's send is under way: the row stays for its finish to delete."""
    admin.execute(
        "UPDATE outbox.message SET status = 'sending', lease_token = gen_random_uuid(),"
        " leased_until = now() + interval '30 seconds' WHERE id = %s",
        [alert],
    )
    path = link_path(settings, alert)

    first = await client.get(path)
    second = await client.get(path)

    assert [first.status_code, second.status_code] == [200, 200], second.text
    assert second.json() == {"status": "acknowledged", "message_id": alert}
    assert admin.execute(
        "SELECT status, acknowledged_at IS NOT NULL FROM outbox.message WHERE id = %s", [alert]
    ).fetchone() == ("sending", True)
    assert outcomes(admin, alert) == ["sent", "acknowledged"]


async def test_an_alert_not_sent_yet_answers_409_with_its_state_and_stays_pending(
    client: AsyncTestClient[Litestar], settings: Settings, admin: psycopg.Connection[Any]
) -> None:
    message_id = enqueue_alert(admin)
    before = snapshot(admin)

    response = await client.get(link_path(settings, message_id))

    assert response.status_code == 409, response.text
    assert response.json() == {
        "status": "pending",
        "detail": "this alert can no longer be acknowledged",
    }
    assert snapshot(admin) == before


BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
"""What Chromium and Firefox send when a person opens a link."""


async def test_a_browser_gets_a_page_that_says_it_is_acknowledged(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
) -> None:
    response = await client.get(link_path(settings, alert), headers=BROWSER)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>Alert acknowledged</h1>" in response.text
    assert f'href="{settings.platform_base_url}"' in response.text
    assert "<script" not in response.text
    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert outcomes(admin, alert) == ["sent", "acknowledged"]  # the page is the same click


@pytest.mark.parametrize(
    ("make", "status", "heading"),
    [
        (lambda s, i: "/ack/garbage", 404, "This link does not work"),
        (lambda s, i: link_path(s, i + 1000), 404, "This link does not work"),
    ],
)
async def test_a_browser_gets_a_page_for_a_bad_link_and_nothing_changes(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
    make: Any,
    status: int,
    heading: str,
) -> None:
    before = snapshot(admin)
    response = await client.get(make(settings, alert), headers=BROWSER)
    assert (response.status_code, response.headers["content-type"][:9]) == (status, "text/html")
    assert f"<h1>{heading}</h1>" in response.text
    assert snapshot(admin) == before


async def test_a_browser_gets_a_page_for_an_alert_not_sent_yet(
    client: AsyncTestClient[Litestar], settings: Settings, admin: psycopg.Connection[Any]
) -> None:
    message_id = enqueue_alert(admin)
    response = await client.get(link_path(settings, message_id), headers=BROWSER)
    assert response.status_code == 409
    assert "<h1>Nothing to acknowledge</h1>" in response.text


async def test_a_program_that_accepts_anything_gets_json(
    client: AsyncTestClient[Litestar], settings: Settings, alert: int
) -> None:
    response = await client.get(link_path(settings, alert), headers={"Accept": "*/*"})
    assert response.json() == {"status": "acknowledged", "message_id": alert}


# ------------------------------------------------------------- links that do not work


def _tampered(settings: Settings, message_id: int) -> str:
    path = link_path(settings, message_id)
    last = path[-1]
    return path[:-1] + ("A" if last != "A" else "B")


BAD_LINKS = {
    "another key": lambda s, i: link_path(
        replace(s, ack_secret=Secret("another-deployment-ack-secret-0123456789")), i
    ),
    "expired": lambda s, i: link_path(s, i, now=time.time() - s.ack_link_ttl - 1),
    "another message": lambda s, i: link_path(s, i + 1000),
    "tampered": _tampered,
    "garbage": lambda s, i: "/ack/garbage",
    "well-formed zeros": lambda s, i: "/ack/v1." + "A" * 43,
    "very long": lambda s, i: "/ack/v1." + "A" * 8000,
    "percent-encoded": lambda s, i: "/ack/%00%ff%2e%2e",
}


@pytest.mark.parametrize("kind", list(BAD_LINKS))
async def test_a_bad_link_answers_404_with_one_body_and_changes_nothing(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
    kind: str,
) -> None:
    before = snapshot(admin)

    response = await client.get(BAD_LINKS[kind](settings, alert))

    assert response.status_code == 404, response.text
    assert response.json() == INVALID
    assert response.content == b'{"detail":"invalid or expired acknowledgement link"}'
    assert snapshot(admin) == before
    # and the genuine link still works afterwards
    assert (await client.get(link_path(settings, alert))).status_code == 200


async def test_head_does_not_acknowledge(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    admin: psycopg.Connection[Any],
    alert: int,
) -> None:
    path = link_path(settings, alert)
    before = snapshot(admin)

    response = await client.head(path)

    assert response.status_code == 405
    assert "GET" in response.headers["allow"]
    assert snapshot(admin) == before
    assert (await client.options(path)).status_code < 300
    assert snapshot(admin) == before
    assert (await client.get(path)).status_code == 200


async def test_links_that_do_not_verify_are_throttled_per_address(
    settings: Settings, admin: psycopg.Connection[Any], alert: int
) -> None:
    strict = replace(settings, api_auth_failures_per_minute=3)
    async with AsyncTestClient(app=create_app(strict, channels={})) as client:
        answers = [(await client.get(f"/ack/guess-{n}")).status_code for n in range(3)]
        refused = await client.get(link_path(settings, alert))

    assert answers == [404, 404, 404]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # the refused click reached nothing
    assert outcomes(admin, alert) == ["sent"]


async def test_bad_links_do_not_lock_the_owner_api_or_health_out_of_that_address(
    settings: Settings, alert: int
) -> None:
    """Links clicked from behind one proxy share its address: their budget is apart."""
    strict = replace(settings, api_auth_failures_per_minute=2)
    async with AsyncTestClient(app=create_app(strict, channels={})) as client:
        guesses = [(await client.get(f"/ack/guess-{n}")).status_code for n in range(3)]
        status = await client.get(STATUS.format(alert), headers=owner())
        health = await client.get("/health")

    assert guesses == [404, 404, 429]
    assert status.status_code == 200, status.text
    assert health.status_code == 200, health.text


async def test_a_genuine_link_to_an_unknown_message_is_not_counted_as_a_guess(
    settings: Settings, alert: int
) -> None:
    strict = replace(settings, api_auth_failures_per_minute=2)
    async with AsyncTestClient(app=create_app(strict, channels={})) as client:
        unknown = [(await client.get(link_path(settings, 10**9 + n))).status_code for n in range(4)]
        genuine = await client.get(link_path(settings, alert))

    assert unknown == [404] * 4
    assert genuine.status_code == 200, genuine.text


async def test_the_link_answers_503_when_the_database_is_down(settings: Settings) -> None:
    down = replace(settings, database_url="postgresql://postgres@127.0.0.1:9/outbox")
    async with AsyncTestClient(app=create_app(down, channels={})) as client:
        response = await client.get(link_path(settings, 42))

    assert response.status_code == 503, response.text


# ------------------------------------------------------------------- message status


STATUS = "/api/v1/messages/{}"


async def test_the_status_needs_an_owner_token(
    client: AsyncTestClient[Litestar], alert: int
) -> None:
    assert (await client.get(STATUS.format(alert))).status_code == 401
    forged = {"Authorization": "Bearer " + jwt.encode({"sub": "x", "role": "owner"}, "k" * 40)}
    assert (await client.get(STATUS.format(alert), headers=forged)).status_code == 401
    assert (await client.get(STATUS.format(alert), headers=owner("user"))).status_code == 403


@pytest.mark.parametrize(
    "message_id", ["999999", "-1732000000000000", "0", str(2**63), str(10**30)]
)
async def test_an_unknown_message_answers_404(
    client: AsyncTestClient[Litestar], message_id: str
) -> None:
    response = await client.get(STATUS.format(message_id), headers=owner())

    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "message not found"}


async def test_the_status_of_an_alert_waiting_for_its_acknowledgement(
    client: AsyncTestClient[Litestar], alert: int
) -> None:
    response = await client.get(STATUS.format(alert), headers=owner())

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == alert and answer["state"] == "awaiting_ack"
    assert answer["channel"] == "email"
    [attempt] = answer["attempts"]
    assert set(attempt) == {"attempt", "channel", "outcome", "error_class", "at"}
    assert (attempt["attempt"], attempt["channel"], attempt["outcome"]) == (1, "email", "sent")
    assert attempt["error_class"] is None
    at = datetime.fromisoformat(attempt["at"])
    assert attempt["at"].endswith("Z") and at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - at) < timedelta(minutes=5)


async def test_attempt_times_are_in_utc_whatever_the_servers_time_zone(
    settings: Settings, admin: psycopg.Connection[Any], alert: int
) -> None:
    (database,) = admin.execute("SELECT current_database()").fetchone() or ("",)
    admin.execute(f"ALTER DATABASE \"{database}\" SET TimeZone = 'Asia/Kolkata'")
    async with AsyncTestClient(app=create_app(settings, channels={})) as client:
        answer = (await client.get(STATUS.format(alert), headers=owner())).json()

    [attempt] = answer["attempts"]
    assert attempt["at"].endswith("Z"), attempt


async def test_the_status_after_the_link_keeps_the_channel_of_the_last_attempt(
    client: AsyncTestClient[Litestar], settings: Settings, alert: int
) -> None:
    assert (await client.get(link_path(settings, alert))).status_code == 200

    answer = (await client.get(STATUS.format(alert), headers=owner())).json()

    assert answer["state"] == "acknowledged" and answer["channel"] == "email"
    assert [a["outcome"] for a in answer["attempts"]] == ["sent", "acknowledged"]
    first, second = (datetime.fromisoformat(a["at"]) for a in answer["attempts"])
    assert first <= second


async def test_the_status_of_a_message_never_attempted(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any]
) -> None:
    message_id = enqueue_alert(admin)

    answer = (await client.get(STATUS.format(message_id), headers=owner())).json()

    assert answer == {"id": message_id, "state": "pending", "channel": "email", "attempts": []}


async def test_the_status_answers_503_when_the_database_is_down(settings: Settings) -> None:
    down = replace(settings, database_url="postgresql://postgres@127.0.0.1:9/outbox")
    async with AsyncTestClient(app=create_app(down, channels={})) as client:
        response = await client.get(STATUS.format(1), headers=owner())

    assert response.status_code == 503, response.text


async def test_both_routes_are_in_the_openapi_schema(client: AsyncTestClient[Litestar]) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]

    ack = paths["/ack/{token}"]["get"]
    status = paths["/api/v1/messages/{message_id}"]["get"]
    assert "security" not in ack and {"200", "404", "409", "429", "503"} <= set(ack["responses"])
    assert status["security"] == [{"BearerToken": []}]
    assert {"200", "401", "403", "404", "503"} <= set(status["responses"])
    assert "head" not in paths["/ack/{token}"]


# --------------------------------------------- the API's real role: outbox_dispatcher


@pytest.fixture
def dispatcher_login(database_url: str, admin: psycopg.Connection[Any]) -> Iterator[str]:
    """The URL of a new login role in outbox_dispatcher (the role the API runs as)."""
    role = f"r_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE outbox_dispatcher")
    parts = urlsplit(database_url)
    netloc = parts.netloc.split("@", 1)[-1]
    try:
        yield urlunsplit((parts.scheme, f"{role}@{netloc}", parts.path, parts.query, ""))
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        admin.execute(f"DROP ROLE {role}")


async def test_the_api_role_acknowledges_and_reads_messages_it_did_not_enqueue(
    settings: Settings, dispatcher_login: str, admin: psycopg.Connection[Any], alert: int
) -> None:
    as_api = replace(settings, database_url=dispatcher_login)
    async with AsyncTestClient(app=create_app(as_api, channels={})) as client:
        acknowledged = await client.get(link_path(settings, alert))
        status = await client.get(STATUS.format(alert), headers=owner())

    assert acknowledged.status_code == 200, acknowledged.text
    assert status.status_code == 200, status.text
    assert status.json()["state"] == "acknowledged"
    assert outcomes(admin, alert) == ["sent", "acknowledged"]
