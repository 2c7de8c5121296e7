"""The trading service writes alerts through the outbox, in its own transactions."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

import outbox
from examples.trading_service.models import Base, EntryOrder, Position
from examples.trading_service.service import BrokerError, TradingService
from outbox._migrate import sqlalchemy_url
from outbox.dispatcher.channels.base import RenderedEmail
from outbox.testing import assert_enqueued, assert_nothing_enqueued, drain


class FakeBroker:
    """A broker whose closes and entries fail for the tickets and orders listed."""

    def __init__(
        self,
        *,
        failing_closes: frozenset[str] = frozenset(),
        reject_entries: bool = False,
    ) -> None:
        self.failing_closes = failing_closes
        self.reject_entries = reject_entries
        self.opened = 0
        self.closed: list[str] = []

    def open(self, order: EntryOrder) -> str:
        if self.reject_entries:
            raise BrokerError("insufficient margin")
        self.opened += 1
        return f"T-{order.approval_id}"

    def close(self, ticket: str, price: Decimal) -> None:
        if ticket in self.failing_closes:
            raise BrokerError("broker timeout")
        self.closed.append(ticket)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlalchemy_url(database_url))
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE SCHEMA trading")
        Base.metadata.create_all(connection)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def messages(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT channel, user_id, template, vars, lane, idempotency_key"
            " FROM outbox.message ORDER BY id"
        ).fetchall()


def open_position(service: TradingService, user: str = "alice") -> Position:
    order_id = service.place_order(
        EntryOrder(
            user_id=user,
            instrument="EURUSD",
            side="buy",
            volume=Decimal("100000"),
            price=Decimal("1.0850"),
            stop_loss=Decimal("1.0800"),
            take_profit=Decimal("1.0950"),
            approval_id=f"APR-{user}",
        )
    )
    position = service.execute_entry(order_id)
    assert position is not None
    return position


def test_a_failed_stop_loss_close_marks_the_position_and_writes_the_alert_together(
    sessions: sessionmaker[Session],
    database_url: str,
) -> None:
    broker = FakeBroker(failing_closes=frozenset({"T-APR-alice"}))
    service = TradingService(sessions, broker)
    service.register_trader(
        "alice", email="alice@example.com", telegram_chat_id=42, alert_channel="telegram"
    )
    service.register_trader("bob", email="bob@example.com")
    open_position(service, "alice")
    open_position(service, "bob")

    results = service.on_price("EURUSD", Decimal("1.0790"))

    assert [(r.ticket, r.kind, r.closed) for r in results] == [
        ("T-APR-alice", "sl", False),
        ("T-APR-bob", "sl", True),
    ]
    with sessions() as session:
        states = dict(session.execute(select(Position.broker_ticket, Position.state)).all())
    assert states == {"T-APR-alice": "sl_close_failed", "T-APR-bob": "closed"}
    # outbox's test kit reads outbox.message through the test's own connection
    with psycopg.connect(database_url) as conn:
        alert = assert_enqueued(
            conn,
            user_id="alice",
            channel="telegram",
            template="position_failure_sl",
            lane="transactional",
            vars={"broker_ticket": "T-APR-alice", "loss_amount": "600.00"},
        )
        assert_nothing_enqueued(conn, user_id="bob")
    assert alert.idempotency_key == "sl-close-failed-T-APR-alice"


def test_an_alert_is_visible_to_its_own_transaction_before_the_commit_and_gone_after_rollback(
    sessions: sessionmaker[Session],
) -> None:
    service = TradingService(sessions, FakeBroker())
    service.register_trader("alice", email="alice@example.com")
    with sessions() as session:
        outbox.enqueue(
            session,
            user_id="alice",
            channel="email",
            template="price_alert",
            vars={
                "instrument": "EURUSD",
                "condition": "above",
                "trigger_price": "1.0900",
                "current_price": "1.0902",
            },
        )
        # the same session, the same open transaction: no commit needed to check it
        assert_enqueued(session, user_id="alice", template="price_alert")
        session.rollback()
        assert_nothing_enqueued(session)


def test_when_the_business_change_fails_the_alert_is_rolled_back_with_it(
    sessions: sessionmaker[Session],
    database_url: str,
) -> None:
    service = TradingService(sessions, FakeBroker(failing_closes=frozenset({"T-APR-alice"})))
    service.register_trader("alice", email="alice@example.com")
    open_position(service)

    # a bad price feed: the close price violates the position's CHECK constraint,
    # which the database reports at commit, after the alert was inserted
    with pytest.raises(IntegrityError):
        service.on_price("EURUSD", Decimal("-1"))

    assert messages(database_url) == []
    with sessions() as session:
        assert session.scalars(select(Position.state)).all() == ["open"]


def test_a_rejected_entry_is_recorded_and_alerted_once(
    sessions: sessionmaker[Session],
    database_url: str,
) -> None:
    service = TradingService(sessions, FakeBroker(reject_entries=True))
    service.register_trader("alice", email="alice@example.com")
    order = EntryOrder(
        user_id="alice",
        instrument="XAUUSD",
        side="sell",
        volume=Decimal("10"),
        price=Decimal("2384.10"),
        stop_loss=Decimal("2400"),
        take_profit=Decimal("2350"),
        approval_id="APR-7",
    )
    order_id = service.place_order(order)

    assert service.execute_entry(order_id) is None
    assert service.execute_entry(order_id) is None  # a retried job: same idempotency key

    with sessions() as session:
        stored = session.get_one(EntryOrder, order_id)
        assert (stored.state, stored.reject_reason) == ("rejected", "insufficient margin")
    [(channel, user, template, variables, _lane, key)] = messages(database_url)
    assert (channel, user, template, key) == (
        "email",
        "alice",
        "position_failure_entry",
        "entry-failed-APR-7",
    )
    assert variables["approval_id"] == "APR-7" and variables["volume"] == "10"


def test_a_dispatcher_delivers_the_committed_alert(
    sessions: sessionmaker[Session],
    database_url: str,
) -> None:
    service = TradingService(sessions, FakeBroker(failing_closes=frozenset({"T-APR-alice"})))
    service.register_trader("alice", email="alice@example.com")
    open_position(service)
    service.on_price("EURUSD", Decimal("1.0970"))  # take-profit, close fails

    # the real dispatcher loop and templates, in-process, channels that only record
    sent = drain(database_url)

    [envelope] = sent.for_user("alice", channel="email")
    assert envelope.recipient.email == "alice@example.com"
    assert isinstance(envelope.content, RenderedEmail)
    assert envelope.content.subject == "✅ Manual Take Profit Close Required"
    assert "T-APR-alice" in envelope.content.text and "1.097" in envelope.content.text
    assert messages(database_url) == []  # delivered rows leave the table
