"""The trading service's own tables, in their own schema (``trading``).

Nothing here knows about the outbox: these are the business tables whose changes
the alerts describe. The outbox's tables live in the schema ``outbox`` of the same
database, so one transaction covers both.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, MetaData, Numeric, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Price = Numeric(18, 8)


class Base(DeclarativeBase):
    metadata = MetaData(schema="trading")


class Account(Base):
    """A trader and the channel their alerts go to first."""

    __tablename__ = "account"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    email: Mapped[str]
    telegram_chat_id: Mapped[int | None]
    alert_channel: Mapped[str] = mapped_column(default="email")

    __table_args__ = (
        CheckConstraint("alert_channel IN ('email', 'telegram', 'push')", name="alert_channel"),
    )


class EntryOrder(Base):
    """An approved trade the platform must open at the broker."""

    __tablename__ = "entry_order"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey(Account.user_id))
    instrument: Mapped[str]
    side: Mapped[str]
    volume: Mapped[Decimal] = mapped_column(Price)
    price: Mapped[Decimal] = mapped_column(Price)
    stop_loss: Mapped[Decimal] = mapped_column(Price)
    take_profit: Mapped[Decimal] = mapped_column(Price)
    approval_id: Mapped[str] = mapped_column(unique=True)
    state: Mapped[str] = mapped_column(default="pending")
    reject_reason: Mapped[str | None]

    __table_args__ = (
        CheckConstraint("side IN ('buy', 'sell')", name="order_side"),
        CheckConstraint("state IN ('pending', 'filled', 'rejected')", name="order_state"),
    )


class Position(Base):
    """An open (or closed) position with its stop-loss and take-profit."""

    __tablename__ = "position"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey(Account.user_id))
    instrument: Mapped[str]
    side: Mapped[str]
    volume: Mapped[Decimal] = mapped_column(Price)
    entry_price: Mapped[Decimal] = mapped_column(Price)
    stop_loss: Mapped[Decimal] = mapped_column(Price)
    take_profit: Mapped[Decimal] = mapped_column(Price)
    broker_ticket: Mapped[str] = mapped_column(unique=True)
    state: Mapped[str] = mapped_column(default="open")
    close_price: Mapped[Decimal | None] = mapped_column(Price)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (
        CheckConstraint("side IN ('buy', 'sell')", name="position_side"),
        CheckConstraint(
            "state IN ('open', 'closed', 'sl_close_failed', 'tp_close_failed')",
            name="position_state",
        ),
        CheckConstraint("close_price IS NULL OR close_price > 0", name="close_price_positive"),
    )

    def triggered(self, price: Decimal) -> str | None:
        """``"sl"`` or ``"tp"`` when ``price`` reaches the stop-loss or take-profit."""
        if self.side == "buy":
            if price <= self.stop_loss:
                return "sl"
            if price >= self.take_profit:
                return "tp"
        else:
            if price >= self.stop_loss:
                return "sl"
            if price <= self.take_profit:
                return "tp"
        return None
