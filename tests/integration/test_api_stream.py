"""``GET /api/v1/inbox/stream`` over a real socket: uvicorn serving the app in the test's
event loop, httpx reading the Server-Sent Events, real PostgreSQL writing the items
(the dispatcher's own statement, with its NOTIFY) and restarting under the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import uvicorn
from litestar import Litestar

from outbox._queries import QUERIES
from outbox._settings import Secret, Settings
from outbox.api import create_app
from outbox.api._inbox_fanout import MAX_QUEUED, Subscriber
from outbox.api._inbox_stream import MAX_STREAMS_PER_USER
from outbox.api._server import ApiServer
from tests.support.pg_cluster import ThrowawayCluster, free_port
from tests.support.roles import login_role
from tests.support.sse import SseReader

SECRET = "api-jwt-secret-for-the-stream-tests-0123456789"
STREAM = "/api/v1/inbox/stream"
_message_ids = itertools.count(5_000)


def bearer(sub: str = "alice", role: str = "user") -> dict[str, str]:
    claims = {"sub": sub, "role": role, "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def deliver(conn: psycopg.Connection[Any], user: str, title: str) -> int:
    """Channel inapp's effect (item and NOTIFY); committed when ``conn`` autocommits."""
    params = {
        "user_id": user,
        "message_id": next(_message_ids),
        "template": "price_alert",
        "title": title,
        "body": f"{title}: the body",
        "url": None,
    }
    conn.execute(QUERIES["effect_inbox_item"], params)
    row = conn.execute(
        "SELECT id FROM outbox.inbox_item WHERE message_id = %s", [params["message_id"]]
    ).fetchone()
    assert row is not None
    return int(row[0])


def settings_for(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        api_jwt_secret=Secret(SECRET),
        api_auth_failures_per_minute=1000,
    )


@asynccontextmanager
async def serving(app: Litestar) -> AsyncIterator[str]:
    """The app behind uvicorn on a free loopback port, in this event loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = ApiServer(config, app)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the API did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@asynccontextmanager
async def stream(
    base: str, user: str = "alice", *, last_event_id: str | None = None
) -> AsyncIterator[SseReader]:
    """An open stream of ``user``, read once its opening lines arrived (registered)."""
    headers = bearer(user) | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    async with (
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as http,
        http.stream("GET", STREAM, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        async with SseReader(response) as reader:
            assert await reader.next_comment(timeout=5) == "connected"
            yield reader


@pytest.fixture
def app(database_url: str) -> Litestar:
    return create_app(settings_for(database_url), channels={}, stream_heartbeat=15)


@pytest.fixture
async def base(app: Litestar) -> AsyncIterator[str]:
    async with serving(app) as url:
        yield url


def listeners(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'outbox-api-inbox' AND datname = current_database()"
    ).fetchone()
    return int(row[0]) if row else 0


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ live items


async def test_a_new_item_reaches_only_its_users_stream_within_a_second(
    base: str, admin: psycopg.Connection[Any]
) -> None:
    deliver(admin, "alice", "before the stream")  # not replayed: the stream starts now
    async with stream(base, "alice") as alice, stream(base, "bob") as bob:
        assert alice.retry == 2000
        deliver(admin, "bob", "bob's")
        committed = time.monotonic()
        item = deliver(admin, "alice", "EURUSD above 1.1")
        after_commit = time.monotonic()

        event = await alice.next_event(timeout=2)
        latency = time.monotonic() - after_commit

        bobs = await bob.next_event(timeout=2)
        async with httpx.AsyncClient(base_url=base) as http:
            listed = (await http.get("/api/v1/inbox", headers=bearer("alice"))).json()["items"][0]

    assert latency < 1.0, f"{latency:.3f} s from commit to event"
    assert event.id == str(item)
    assert event.event == "item"
    assert event.json() == listed  # the shape of GET /api/v1/inbox's items
    assert event.json()["title"] == "EURUSD above 1.1"
    assert bobs.json()["title"] == "bob's"
    assert committed <= after_commit


async def test_every_stream_of_a_user_gets_the_item_over_one_listening_connection(
    base: str, admin: psycopg.Connection[Any]
) -> None:
    async with (
        stream(base, "alice") as first,
        stream(base, "alice") as second,
        stream(base, "bob") as third,
        stream(base, "carol") as fourth,
    ):
        assert listeners(admin) == 1
        item = deliver(admin, "alice", "one")
        got = [await first.next_event(timeout=2), await second.next_event(timeout=2)]
        assert [e.id for e in got] == [str(item), str(item)]
        deliver(admin, "carol", "carol's")
        assert (await fourth.next_event(timeout=2)).json()["title"] == "carol's"
        with pytest.raises(TimeoutError):
            await third.next_event(timeout=0.5)  # bob has nothing


async def test_a_forged_notification_shows_nobody_another_users_item(
    base: str, admin: psycopg.Connection[Any]
) -> None:
    async with stream(base, "alice") as alice, stream(base, "bob") as bob:
        bobs = deliver(admin, "bob", "bob's secret")
        assert (await bob.next_event(timeout=2)).id == str(bobs)
        admin.execute("SELECT pg_notify('outbox_inbox', %s)", [f"{bobs} alice"])
        admin.execute("SELECT pg_notify('outbox_inbox', 'garbage')")
        admin.execute("SELECT pg_notify('outbox_inbox', '99999999999999999999999 alice')")
        with pytest.raises(TimeoutError):
            await alice.next_event(timeout=1.0)
        mine = deliver(admin, "alice", "alice's")
        assert (await alice.next_event(timeout=2)).id == str(mine)  # the stream still works
        with pytest.raises(TimeoutError):
            await bob.next_event(timeout=0.3)  # a forged word repeats nothing either


async def test_an_item_committed_out_of_id_order_still_reaches_the_open_stream(
    base: str, admin: psycopg.Connection[Any], database_url: str
) -> None:
    async with stream(base, "alice") as alice:
        with psycopg.connect(database_url) as slow:  # takes the smaller id, commits last
            early_id = deliver(slow, "alice", "slow transaction")
            late_id = deliver(admin, "alice", "quick transaction")
            assert early_id < late_id
            assert (await alice.next_event(timeout=2)).id == str(late_id)
            slow.commit()
        assert (await alice.next_event(timeout=2)).id == str(early_id)


# ------------------------------------------------------------------ resuming


async def test_last_event_id_resumes_with_the_items_written_while_away(
    base: str, admin: psycopg.Connection[Any]
) -> None:
    async with stream(base, "alice") as first:
        seen = deliver(admin, "alice", "seen")
        assert (await first.next_event(timeout=2)).id == str(seen)
    away = [deliver(admin, "alice", f"while away {n}") for n in range(3)]
    deliver(admin, "bob", "bob's, meanwhile")

    async with stream(base, "alice", last_event_id=str(seen)) as resumed:
        replayed = [await resumed.next_event(timeout=2) for _ in away]
        live = deliver(admin, "alice", "live again")
        after = await resumed.next_event(timeout=2)

    assert [e.id for e in replayed] == [str(i) for i in away]
    assert after.id == str(live)


async def test_a_resume_with_a_long_backlog_reads_it_page_by_page(
    base: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "INSERT INTO outbox.inbox_item (user_id, message_id, template, title, body)"
        " SELECT 'alice', 100000 + g, 'price_alert', 'backlog ' || g, 'b'"
        "   FROM generate_series(1, 250) g"
    )
    async with stream(base, "alice", last_event_id="0") as resumed:
        ids = [int((await resumed.next_event(timeout=5)).id or 0) for _ in range(250)]
        with pytest.raises(TimeoutError):
            await resumed.next_event(timeout=0.3)
    assert ids == sorted(ids) and len(set(ids)) == 250


@pytest.mark.parametrize(
    "value", ["abc", "-1", "1.5", "1e3", "0x10", "9223372036854775808", "12 13", "١٢", "+5"]
)
async def test_a_garbage_last_event_id_answers_400(base: str, value: str) -> None:
    headers = bearer() | {"Last-Event-ID": value.encode()}  # raw bytes: any header value
    async with httpx.AsyncClient(base_url=base) as http:
        response = await http.get(STREAM, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "Last-Event-ID must be the id of an inbox item (digits)"


# ------------------------------------------------------------------ keeping it open


async def test_an_idle_stream_gets_heartbeat_comments(database_url: str) -> None:
    app = create_app(settings_for(database_url), channels={}, stream_heartbeat=0.3)
    async with serving(app) as url, stream(url, "alice") as alice:
        started = time.monotonic()
        assert await alice.next_comment(timeout=2) == "heartbeat"
        assert await alice.next_comment(timeout=2) == "heartbeat"
        assert 0.5 <= time.monotonic() - started < 2


async def test_the_listener_reconnects_and_streams_catch_up_what_it_missed(
    base: str, app: Litestar, admin: psycopg.Connection[Any]
) -> None:
    fanout = app.state["inbox_fanout"]
    async with stream(base, "alice") as alice:
        await wait_for(lambda: fanout.connected, 5, "the listener")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'outbox-api-inbox' AND datname = current_database()"
        )
        missed = deliver(admin, "alice", "while nobody listened")  # its NOTIFY is lost
        assert (await alice.next_event(timeout=5)).id == str(missed)
        await wait_for(lambda: fanout.connected, 5, "the listener again")
        live = deliver(admin, "alice", "after the reconnect")
        assert (await alice.next_event(timeout=2)).id == str(live)
    assert fanout.reconnects >= 1


@pytest.fixture
def cluster() -> Iterator[ThrowawayCluster]:
    with ThrowawayCluster() as cluster:
        yield cluster


@pytest.mark.timeout(90)
async def test_streams_stay_open_through_a_database_restart_and_lose_nothing(
    cluster: ThrowawayCluster,
) -> None:
    url = cluster.create_database("outbox")
    app = create_app(settings_for(url), channels={})
    async with serving(app) as base, stream(base, "alice") as alice:
        with psycopg.connect(url, autocommit=True) as conn:
            first = deliver(conn, "alice", "before the restart")
        assert (await alice.next_event(timeout=2)).id == str(first)

        await asyncio.to_thread(cluster.stop, "fast")
        await asyncio.to_thread(cluster.start)
        with psycopg.connect(url, autocommit=True) as conn:
            # written the moment the server is back: before the listener is, maybe
            right_after = deliver(conn, "alice", "right after the restart")
        assert (await alice.next_event(timeout=15)).id == str(right_after)
        await wait_for(lambda: app.state["inbox_fanout"].connected, 15, "the listener")
        with psycopg.connect(url, autocommit=True) as conn:
            later = deliver(conn, "alice", "later")
            committed = time.monotonic()
        assert (await alice.next_event(timeout=2)).id == str(later)
        assert time.monotonic() - committed < 1.0


# ------------------------------------------------------------------ limits and lifetime


async def test_a_closed_stream_is_forgotten(base: str, app: Litestar) -> None:
    fanout = app.state["inbox_fanout"]
    async with stream(base, "alice"), stream(base, "alice"):
        assert fanout.streams_of("alice") == 2
    await wait_for(lambda: fanout.stream_count == 0, 5, "the streams to be dropped")


async def test_a_user_may_hold_a_bounded_number_of_streams(base: str) -> None:
    async with AsyncExitStack() as streams:
        for _ in range(MAX_STREAMS_PER_USER):
            await streams.enter_async_context(stream(base, "alice"))
        async with httpx.AsyncClient(base_url=base) as http:
            refused = await http.get(STREAM, headers=bearer("alice"))
        async with stream(base, "bob"):
            pass  # another user is not affected
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "5"
    assert "streams per user" in refused.json()["detail"]


async def test_shutting_down_ends_open_streams_promptly(app: Litestar) -> None:
    async with serving(app) as base:
        reader_cm = stream(base, "alice")
        alice = await reader_cm.__aenter__()
        try:
            shutdown_started = time.monotonic()
            app_fanout = app.state["inbox_fanout"]
            app_fanout.end_streams()  # what ApiServer.shutdown does first
            with pytest.raises(EOFError):
                await alice.next_event(timeout=5)
            assert time.monotonic() - shutdown_started < 2
        finally:
            await reader_cm.__aexit__(None, None, None)
        async with httpx.AsyncClient(base_url=base) as http:
            refused = await http.get(STREAM, headers=bearer("alice"))
        assert refused.status_code == 503


async def test_the_api_role_serves_the_stream(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    with login_role(admin, database_url, "outbox_dispatcher") as url:
        app = create_app(replace(settings_for(database_url), database_url=url), channels={})
        async with serving(app) as base, stream(base, "alice") as alice:
            await wait_for(lambda: app.state["inbox_fanout"].connected, 5, "the listener")
            item = deliver(admin, "alice", "one")
            assert (await alice.next_event(timeout=2)).id == str(item)


async def test_the_stream_refuses_the_owner_and_tokens_without_a_user(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        owner = await http.get(STREAM, headers=bearer("owner-1", role="owner"))
        nobody = await http.get(STREAM)
        no_sub = await http.get(
            STREAM,
            headers={
                "Authorization": "Bearer "
                + jwt.encode({"role": "user", "exp": int(time.time()) + 60}, SECRET)
            },
        )
    assert (owner.status_code, nobody.status_code, no_sub.status_code) == (403, 401, 401)


# ------------------------------------------------------------------ a slow reader


def test_a_stream_that_falls_behind_drops_its_queue_and_catches_up_by_id() -> None:
    async def run() -> Subscriber:
        subscriber = Subscriber("alice", cursor=10)
        subscriber.catch_up = False
        for n in range(MAX_QUEUED + 1):
            subscriber.offer((11 + n, b"event"))
        return subscriber

    subscriber = asyncio.run(run())
    assert subscriber.catch_up is True
    assert len(subscriber.pending) == 0  # read back from the table, after cursor 10
    assert subscriber.wake.is_set()
