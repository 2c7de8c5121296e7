"""The user's side end to end: ``outbox dispatch`` and ``outbox api`` subprocesses.

An in-app alert reaches its user's inbox and open stream and nobody else's; reading
it clears the unread count and acknowledges the alert; another user can neither
read nor mark it; a browser's subscription is stored and deleted through the API;
SIGTERM ends the API promptly with a stream open.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest

import outbox
from outbox.testing.push import PushSubscriber, VapidKeys
from tests.acceptance.conftest import Spawn, wait_until
from tests.support.pg_cluster import free_port
from tests.support.sse import SseReader

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "jwt-secret-for-the-inbox-test-0123456789abcdef"
ALERT = {
    "instrument": "GBPUSD",
    "trigger_price": "1.2700",
    "current_price": "1.2712",
    "condition": "above",
}


def user(sub: str) -> dict[str, str]:
    claims = {"sub": sub, "role": "user", "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


ALICE, BOB = user("alice"), user("bob")


@dataclass
class Api:
    url: str
    process: subprocess.Popen[bytes]
    vapid: VapidKeys


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """``outbox api`` on a free port, with a VAPID key."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    vapid = VapidKeys.generate()
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_API_JWT_SECRET": JWT_SECRET,
        "OUTBOX_API_PUBLIC_URL": url,
        "OUTBOX_VAPID_PRIVATE_KEY": vapid.private_raw,
        "PYTHONPATH": str(ROOT),
    }
    with open(tmp_path / "api.log", "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox")), "api", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: _health(url) == 200, 30, "the API to start")
        yield Api(url, process, vapid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@asynccontextmanager
async def stream(url: str, headers: dict[str, str]) -> AsyncIterator[SseReader]:
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=None)) as http,
        http.stream("GET", "/api/v1/inbox/stream", headers=headers) as response,
    ):
        assert response.status_code == 200
        async with SseReader(response) as reader:
            assert await reader.next_comment(timeout=10) == "connected"
            yield reader


def unread(api: Api, headers: dict[str, str]) -> int:
    answer = httpx.get(f"{api.url}/api/v1/inbox/unread-count", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["unread"])


async def test_an_inapp_alert_reaches_only_its_users_inbox_and_stream(
    api: Api, admin: psycopg.Connection[Any], spawn_dispatcher: Spawn
) -> None:
    for name in ("alice", "bob"):
        outbox.upsert_recipient(admin, name, email=f"{name}@example.com")
    async with stream(api.url, ALICE) as alice_stream, stream(api.url, BOB) as bob_stream:
        alert = outbox.enqueue(
            admin,
            user_id="alice",
            channel="inapp",
            template="price_alert",
            vars=ALERT,
            escalate_after=600,
        )
        spawn_dispatcher(OUTBOX_POLL_INTERVAL="0.2")
        event = await alice_stream.next_event(timeout=30)
        with pytest.raises(TimeoutError):
            await bob_stream.next_event(timeout=1.0)

    item = event.json()
    assert event.event == "item" and event.id == str(item["id"])
    assert item["message_id"] == alert
    assert "GBPUSD" in item["title"]
    listed = httpx.get(f"{api.url}/api/v1/inbox", headers=ALICE, timeout=10).json()
    assert listed == {"items": [item], "next_cursor": None}
    assert httpx.get(f"{api.url}/api/v1/inbox", headers=BOB, timeout=10).json()["items"] == []
    assert (unread(api, ALICE), unread(api, BOB)) == (1, 0)
    status = outbox.message_status(admin, alert)
    assert status is not None and status.state == "awaiting_ack"

    # bob can neither read nor mark alice's item
    read_by_bob = httpx.post(f"{api.url}/api/v1/inbox/{item['id']}/read", headers=BOB, timeout=10)
    all_by_bob = httpx.post(f"{api.url}/api/v1/inbox/read-all", headers=BOB, timeout=10)
    assert read_by_bob.status_code == 404
    assert all_by_bob.json() == {"read": 0}
    assert unread(api, ALICE) == 1
    assert outbox.message_status(admin, alert).state == "awaiting_ack"  # type: ignore[union-attr]

    # alice reads it: unread clears, and the alert is acknowledged (no escalation)
    read = httpx.post(f"{api.url}/api/v1/inbox/{item['id']}/read", headers=ALICE, timeout=10)
    assert read.status_code == 200 and read.json() == {"read": True}
    assert unread(api, ALICE) == 0
    assert outbox.message_status(admin, alert).state == "acknowledged"  # type: ignore[union-attr]
    assert outbox.inbox(admin, "alice")[0].read_at is not None


def test_subscribe_and_unsubscribe_change_push_subscription(
    api: Api, admin: psycopg.Connection[Any]
) -> None:
    key = httpx.get(f"{api.url}/api/v1/push/vapid-public-key", headers=ALICE, timeout=10)
    assert key.json() == {"key": api.vapid.public_raw}
    browser = PushSubscriber.create(
        "https://fcm.googleapis.com/fcm/send/acceptance", api.vapid.public_raw
    )
    endpoint = f"{api.url}/api/v1/push/subscriptions"

    added = httpx.post(endpoint, headers=ALICE, json=browser.info | {"expirationTime": None})
    assert added.status_code == 201, added.text
    rows = admin.execute("SELECT user_id, endpoint, p256dh, auth FROM outbox.push_subscription")
    assert rows.fetchall() == [("alice", browser.endpoint, browser.p256dh, browser.auth)]

    taken = httpx.post(endpoint, headers=BOB, json=browser.info)
    not_bobs = httpx.request("DELETE", endpoint, headers=BOB, json={"endpoint": browser.endpoint})
    assert (taken.status_code, not_bobs.status_code) == (409, 404)

    removed = httpx.request("DELETE", endpoint, headers=ALICE, json={"endpoint": browser.endpoint})
    assert removed.status_code == 204, removed.text
    assert admin.execute("SELECT count(*) FROM outbox.push_subscription").fetchone() == (0,)


async def test_sigterm_ends_the_api_promptly_with_a_stream_open(api: Api) -> None:
    async with stream(api.url, ALICE) as alice_stream:
        api.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(EOFError):
            await alice_stream.next_event(timeout=10)
    code = api.process.wait(10)
    assert time.monotonic() - signalled < 5
    # uvicorn shuts down gracefully, then lets the signal end the process as it would
    assert code == 0  # a graceful stop, not death by the signal
