"""A user's push subscriptions from Python: list them, remove one (the browser
unsubscribed), in the caller's transaction, on every connection kind."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import outbox
from outbox.testing.push import PushSubscriber
from tests.integration.test_enqueue import KINDS, Runner
from tests.support.roles import login_role

FCM = "https://fcm.googleapis.com/fcm/send/"


def subscribe(conn: psycopg.Connection[Any], user: str, token: str) -> PushSubscriber:
    browser = PushSubscriber.create(FCM + token)
    outbox.add_push_subscription(conn, user, browser.info)
    return browser


def endpoints(admin: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return admin.execute(
        "SELECT user_id, endpoint FROM outbox.push_subscription ORDER BY id"
    ).fetchall()


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> tuple[Runner, bool]:
    return KINDS[request.param]


def test_a_user_lists_their_own_subscriptions_oldest_first(admin: psycopg.Connection[Any]) -> None:
    phone = subscribe(admin, "alice", "phone")
    subscribe(admin, "bob", "bobs-laptop")
    laptop = subscribe(admin, "alice", "laptop")
    admin.execute(
        "UPDATE outbox.push_subscription SET last_used_at = now() WHERE endpoint = %s",
        [phone.endpoint],
    )

    listed = outbox.list_push_subscriptions(admin, "alice")

    assert [(s.endpoint, s.p256dh, s.auth) for s in listed] == [
        (phone.endpoint, phone.p256dh, phone.auth),
        (laptop.endpoint, laptop.p256dh, laptop.auth),
    ]
    assert listed[0].id < listed[1].id
    assert listed[0].last_used_at is not None and listed[1].last_used_at is None
    assert listed[0].created_at.tzinfo is not None
    assert outbox.list_push_subscriptions(admin, "nobody") == []


def test_removing_a_subscription_deletes_only_that_users_row(
    admin: psycopg.Connection[Any],
) -> None:
    mine = subscribe(admin, "alice", "phone")
    theirs = subscribe(admin, "bob", "phone-of-bob")

    assert outbox.remove_push_subscription(admin, "alice", theirs.endpoint) is False
    assert outbox.remove_push_subscription(admin, "alice", FCM + "never-subscribed") is False
    assert endpoints(admin) == [("alice", mine.endpoint), ("bob", theirs.endpoint)]

    assert outbox.remove_push_subscription(admin, "alice", mine.endpoint) is True
    assert outbox.remove_push_subscription(admin, "alice", mine.endpoint) is False
    assert endpoints(admin) == [("bob", theirs.endpoint)]


@pytest.mark.parametrize(
    ("user_id", "endpoint"),
    [("", FCM + "x"), ("alice", ""), ("alice", FCM + "x" * 2048), ("a\x00", FCM + "x")],
)
def test_bad_arguments_are_refused_before_the_database_is_asked(
    admin: psycopg.Connection[Any], user_id: str, endpoint: str
) -> None:
    subscribe(admin, "alice", "phone")
    with pytest.raises(outbox.InvalidMessage):
        outbox.remove_push_subscription(admin, user_id, endpoint)
    if user_id != "alice":
        with pytest.raises(outbox.InvalidMessage):
            outbox.list_push_subscriptions(admin, user_id)
    assert len(endpoints(admin)) == 1


def test_list_and_remove_run_in_the_callers_transaction_on_every_connection_kind(
    database_url: str, admin: psycopg.Connection[Any], kind: tuple[Runner, bool]
) -> None:
    run, is_async = kind
    phone = subscribe(admin, "alice", "phone")

    async def async_body(conn: Any) -> Any:
        before = await outbox.list_push_subscriptions_async(conn, "alice")
        removed = await outbox.remove_push_subscription_async(conn, "alice", phone.endpoint)
        return [s.endpoint for s in before], removed

    def sync_body(conn: Any) -> Any:
        before = outbox.list_push_subscriptions(conn, "alice")
        removed = outbox.remove_push_subscription(conn, "alice", phone.endpoint)
        return [s.endpoint for s in before], removed

    body = async_body if is_async else sync_body
    assert run(database_url, body, False) == ([phone.endpoint], True)
    assert endpoints(admin) == [("alice", phone.endpoint)]  # rolled back
    assert run(database_url, body, True) == ([phone.endpoint], True)
    assert endpoints(admin) == []


def test_the_api_role_lists_and_removes_subscriptions(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    phone = subscribe(admin, "alice", "phone")
    with (
        login_role(admin, database_url, "outbox_dispatcher") as url,
        psycopg.connect(url, autocommit=True) as api,
    ):
        assert [s.endpoint for s in outbox.list_push_subscriptions(api, "alice")] == [
            phone.endpoint
        ]
        assert outbox.remove_push_subscription(api, "alice", phone.endpoint) is True
    assert endpoints(admin) == []


def test_the_recipient_writer_lists_subscriptions(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    phone = subscribe(admin, "alice", "phone")
    with (
        login_role(admin, database_url, "outbox_recipient_writer") as url,
        psycopg.connect(url, autocommit=True) as service,
    ):
        listed = outbox.list_push_subscriptions(service, "alice")
    assert [s.endpoint for s in listed] == [phone.endpoint]


def test_the_recipient_writer_removes_a_subscription(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    phone = subscribe(admin, "alice", "phone")
    with (
        login_role(admin, database_url, "outbox_recipient_writer") as url,
        psycopg.connect(url, autocommit=True) as service,
    ):
        assert outbox.remove_push_subscription(service, "alice", phone.endpoint) is True
    assert endpoints(admin) == []
