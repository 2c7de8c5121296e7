"""The trading service: business changes and their alerts, one transaction each.

Every method that changes a position or an order writes the alert about it with
``outbox.enqueue(session, ...)`` inside the same ``session.begin()`` block. If the
block commits, the alert will be delivered (at least once) by the dispatchers; if
anything in it fails, the whole block rolls back and no alert exists. outbox never
commits, flushes or rolls back the session: the service owns the transaction.

The broker is called *outside* any transaction (a network call must not hold row
locks); its answer is then recorded, with the alert, in one short transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import outbox
from examples.trading_service.models import Account, EntryOrder, Position


class BrokerError(Exception):
    """The broker refused or failed an operation."""


class Broker(Protocol):
    """What the service needs from the broker."""

    def open(self, order: EntryOrder) -> str:
        """Open the position; return its ticket. Raises BrokerError."""
        ...

    def close(self, ticket: str, price: Decimal) -> None:
        """Close the position. Raises BrokerError."""
        ...


@dataclass(frozen=True)
class CloseResult:
    """What happened to one triggered position."""

    ticket: str
    kind: str  # sl | tp
    closed: bool
    alert_id: int | None


def _price(value: Decimal) -> str:
    return f"{value.normalize():f}"


class TradingService:
    """Orders, positions and the alerts about them."""

    def __init__(self, sessions: sessionmaker[Session], broker: Broker) -> None:
        self.sessions = sessions
        self.broker = broker

    def register_trader(
        self,
        user_id: str,
        *,
        email: str,
        telegram_chat_id: int | None = None,
        alert_channel: str = "email",
    ) -> None:
        """Create the account and tell outbox where to reach the trader, atomically."""
        with self.sessions.begin() as session:
            session.add(
                Account(
                    user_id=user_id,
                    email=email,
                    telegram_chat_id=telegram_chat_id,
                    alert_channel=alert_channel,
                )
            )
            outbox.upsert_recipient(
                session, user_id, email=email, telegram_chat_id=telegram_chat_id
            )

    def place_order(self, order: EntryOrder) -> int:
        """Store an approved entry order; return its id."""
        with self.sessions.begin() as session:
            session.add(order)
            session.flush()
            return order.id

    def execute_entry(self, order_id: int) -> Position | None:
        """Open the order at the broker; on failure reject it and alert the trader."""
        with self.sessions() as session:
            order = session.get_one(EntryOrder, order_id)
            session.expunge(order)
        try:
            ticket = self.broker.open(order)
        except BrokerError as error:
            with self.sessions.begin() as session:
                stored = session.get_one(EntryOrder, order_id, with_for_update=True)
                stored.state, stored.reject_reason = "rejected", str(error)
                account = session.get_one(Account, stored.user_id)
                outbox.enqueue(
                    session,
                    user_id=stored.user_id,
                    channel=account.alert_channel,
                    template="position_failure_entry",
                    vars={
                        "instrument": stored.instrument,
                        "side": stored.side,
                        "entry_price": _price(stored.price),
                        "volume": _price(stored.volume),
                        "error_reason": str(error),
                        "approval_id": stored.approval_id,
                    },
                    idempotency_key=f"entry-failed-{stored.approval_id}",
                )
            return None
        with self.sessions.begin() as session:
            stored = session.get_one(EntryOrder, order_id, with_for_update=True)
            stored.state = "filled"
            position = Position(
                user_id=stored.user_id,
                instrument=stored.instrument,
                side=stored.side,
                volume=stored.volume,
                entry_price=stored.price,
                stop_loss=stored.stop_loss,
                take_profit=stored.take_profit,
                broker_ticket=ticket,
            )
            session.add(position)
            session.flush()
            session.expunge(position)
            return position

    def on_price(self, instrument: str, price: Decimal) -> list[CloseResult]:
        """Close every open position whose stop-loss or take-profit ``price`` reaches.

        A close the broker fails marks the position ``sl_close_failed`` or
        ``tp_close_failed`` and writes the urgent alert, in one transaction.
        """
        with self.sessions() as session:
            open_positions: Iterable[Position] = session.scalars(
                select(Position).where(Position.instrument == instrument, Position.state == "open")
            ).all()
            triggered = [
                (p.id, p.broker_ticket, kind)
                for p in open_positions
                if (kind := p.triggered(price)) is not None
            ]
        return [
            self._close(position_id, ticket, kind, price) for position_id, ticket, kind in triggered
        ]

    def _close(self, position_id: int, ticket: str, kind: str, price: Decimal) -> CloseResult:
        try:
            self.broker.close(ticket, price)
        except BrokerError:
            failed = True
        else:
            failed = False
        with self.sessions.begin() as session:
            position = session.get_one(Position, position_id, with_for_update=True)
            if position.state != "open":  # another worker handled it meanwhile
                return CloseResult(ticket, kind, position.state == "closed", None)
            position.close_price = price
            position.state = f"{kind}_close_failed" if failed else "closed"
            if not failed:
                return CloseResult(ticket, kind, True, None)
            account = session.get_one(Account, position.user_id)
            amount = abs(price - position.entry_price) * position.volume
            alert_id = outbox.enqueue(
                session,
                user_id=position.user_id,
                channel=account.alert_channel,
                template=f"position_failure_{kind}",
                vars={
                    "instrument": position.instrument,
                    "side": position.side,
                    "entry_price": _price(position.entry_price),
                    "current_price": _price(price),
                    ("loss_amount" if kind == "sl" else "profit_amount"): f"{amount:,.2f}",
                    "broker_ticket": ticket,
                    "currency": "USD",
                },
                idempotency_key=f"{kind}-close-failed-{ticket}",
            )
            # The position's UPDATE is flushed at commit, after the alert's INSERT: if
            # the database refuses it, the alert is rolled back with it.
            return CloseResult(ticket, kind, False, alert_id)
