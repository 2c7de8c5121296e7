"""The demo's trading platform: who the users are and what happens to their positions.

Everything is seeded, so every run tells the same story:

* 1,000 users (``trader-0001`` ...) get a campaign email; every 250th address
  bounces (``550``), so those messages end in the dead-letter queue.
* The first 24 are active traders with positions and entry orders in the
  ``trading`` schema. Each stop-loss, take-profit or entry the broker fails writes
  an alert **in the same transaction** as the position update, to the channel the
  trader chose. A few traders are special: their Telegram blocked the bot (403:
  the alert falls back to another channel), their push subscription is gone (410:
  falls back to email), their mailbox is busy once (451: retried), the Bot API
  fails once for them (500: retried), or their only address bounces (dead letter).
  Two take their alerts by SMS: one receives them, the other replied STOP (Twilio
  21610: SMS disabled for them, the alert falls back to email).
* One transaction writes an alert and is then rolled back on purpose: the alert
  never exists, and no sink ever sees it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any, LiteralString

import psycopg

import outbox
from outbox._queries import parse_queries

TRADERS = 24
MAIL_DOMAIN = "demo.outbox.test"
CHAT_BASE = 7_000_000
CAMPAIGN_BOUNCE_EVERY = 250
SEED = 20240611

TELEGRAM_BLOCKED = ("trader-0003", "trader-0011")
PUSH_GONE = ("trader-0005", "trader-0017")
MAILBOX_BUSY = "trader-0002"
BOT_API_HICCUP = "trader-0009"
ALERT_BOUNCE = "trader-0021"
ROLLED_BACK = "trader-0013"
SMS_TRADER = "trader-0004"
"""Alerts by SMS (the Twilio stand-in)."""
SMS_STOPPED = "trader-0008"
"""Alerts by SMS, but they replied STOP: 21610, SMS disabled for them, next channel."""
NO_PUSH = ("trader-0011",)
"""Telegram blocked and no browser subscribed: the alert falls back twice."""
SPECIAL = (*TELEGRAM_BLOCKED, *PUSH_GONE, MAILBOX_BUSY, BOT_API_HICCUP, SMS_TRADER, SMS_STOPPED)
"""Traders whose stop-loss close always fails, so their story is always told."""

CAMPAIGN_VARS = {
    "instrument": "XAUUSD",
    "trigger_price": "2,400.00",
    "current_price": "2,401.35",
    "condition": "above",
}

INSTRUMENTS: tuple[tuple[str, Decimal, Decimal, Decimal], ...] = (
    # instrument, price, typical move, volume
    ("EURUSD", Decimal("1.0850"), Decimal("0.0040"), Decimal("100000")),
    ("XAUUSD", Decimal("2384.10"), Decimal("12.50"), Decimal("10")),
    ("BTCUSD", Decimal("67250.00"), Decimal("900.00"), Decimal("0.5")),
    ("GBPUSD", Decimal("1.2710"), Decimal("0.0045"), Decimal("100000")),
    ("USDJPY", Decimal("156.40"), Decimal("0.60"), Decimal("100000")),
    ("US500", Decimal("5304.50"), Decimal("25.00"), Decimal("20")),
)

ENTRY_REJECTIONS = (
    "insufficient margin",
    "market closed for this instrument",
    "price moved beyond the allowed slippage",
)


@cache
def queries() -> dict[str, LiteralString]:
    """The named statements of ``api/demo/demo.sql``."""
    text = resources.files("outbox.demo").joinpath("demo.sql").read_text(encoding="utf-8")
    return parse_queries(text)


def user_id(number: int) -> str:
    """``trader-0042``."""
    return f"trader-{number:04d}"


def email_of(user: str) -> str:
    """The user's mailbox at the demo domain."""
    return f"{user}@{MAIL_DOMAIN}"


def chat_of(user: str) -> int:
    """The user's Telegram chat id."""
    return CHAT_BASE + int(user.rsplit("-", 1)[1])


def phone_of(user: str) -> str:
    """The user's mobile number (E.164, from a range reserved for drama)."""
    return f"+447700900{int(user.rsplit('-', 1)[1]):03d}"


def campaign_bounces(users: int) -> list[str]:
    """Users whose mailbox does not exist (every 250th)."""
    return [user_id(n) for n in range(CAMPAIGN_BOUNCE_EVERY, users + 1, CAMPAIGN_BOUNCE_EVERY)]


def alert_channel(user: str) -> str:
    """The channel a trader picked for alerts."""
    if user in TELEGRAM_BLOCKED or user == BOT_API_HICCUP:
        return "telegram"
    if user in PUSH_GONE:
        return "push"
    if user in (MAILBOX_BUSY, ALERT_BOUNCE):
        return "email"
    if user in (SMS_TRADER, SMS_STOPPED):
        return "sms"
    return ("push", "telegram", "email")[int(user.rsplit("-", 1)[1]) % 3]


@dataclass(kw_only=True)
class TradingReport:
    """What the simulation did."""

    updates: int = 0
    failures: int = 0
    alerts: dict[str, int] = field(default_factory=dict)
    rolled_back_ticket: str = ""
    rolled_back_message_id: int = 0
    rolled_back_exists_after: int = -1
    rolled_back_position_state: str = ""

    def count(self, template: str) -> None:
        """Tally one alert written."""
        self.alerts[template] = self.alerts.get(template, 0) + 1


def add_recipients(
    conn: psycopg.Connection[Any],
    users: int,
    subscribe: Callable[[str, bool], Mapping[str, Any]],
) -> int:
    """Register every user with outbox; traders also get Telegram and push.

    ``subscribe(user_id, gone)`` makes a browser subscription at the push service.
    Runs in the caller's transaction; returns the number of push subscriptions.
    """
    subscriptions = 0
    for number in range(1, users + 1):
        user = user_id(number)
        trader = number <= TRADERS
        outbox.upsert_recipient(
            conn,
            user,
            email=email_of(user),
            telegram_chat_id=chat_of(user) if trader and user != ALERT_BOUNCE else None,
            phone=phone_of(user) if user in (SMS_TRADER, SMS_STOPPED) else None,
            timezone="Europe/London",
            # the one trader with nothing but a bouncing mailbox gets no campaigns
            campaign_opt_out=user == ALERT_BOUNCE,
        )
        if trader and alert_channel(user) in ("push", "telegram") and user not in NO_PUSH:
            outbox.add_push_subscription(conn, user, subscribe(user, user in PUSH_GONE))
            subscriptions += 1
        if trader:
            conn.execute(
                queries()["add_account"], {"user_id": user, "alert_channel": alert_channel(user)}
            )
    return subscriptions


def _price(value: Decimal, like: Decimal) -> str:
    return str(value.quantize(like))


def _alert(
    conn: psycopg.Connection[Any],
    report: TradingReport,
    user: str,
    template: str,
    variables: Mapping[str, Any],
    key: str,
) -> int:
    report.count(template)
    return outbox.enqueue(
        conn,
        user_id=user,
        channel=alert_channel(user),
        template=template,
        vars=variables,
        idempotency_key=key,
    )


class BrokerConfirmedAfterAll(Exception):
    """The broker confirmed the close on a late retry: undo the whole unit of work."""


def simulate_trading(conn: psycopg.Connection[Any]) -> TradingReport:
    """Open positions, move prices, fail some closes and entries; commit per update.

    Each position update and its alert are one transaction on ``conn`` (a
    non-autocommit psycopg connection), exactly as a trading service would do it.
    """
    rng = random.Random(SEED)  # noqa: S311 - a repeatable story, not a secret
    report = TradingReport()
    q = queries()
    for number in range(1, TRADERS + 1):
        user = user_id(number)
        instrument, price, move, volume = INSTRUMENTS[number % len(INSTRUMENTS)]
        side = "buy" if number % 2 else "sell"
        sign = 1 if side == "buy" else -1
        for kind in ("sl", "tp"):
            ticket = f"T-{number:04d}{1 if kind == 'sl' else 2}"
            with conn.transaction():
                position = conn.execute(
                    q["open_position"],
                    {
                        "user_id": user,
                        "instrument": instrument,
                        "side": side,
                        "volume": volume,
                        "entry_price": price,
                        "broker_ticket": ticket,
                    },
                ).fetchone()
            assert position is not None
            # the stop-loss is below a buy (above a sell), the take-profit the other way
            direction = -sign if kind == "sl" else sign
            close = price + direction * move * Decimal(rng.randint(80, 160)) / 100
            if user == ALERT_BOUNCE:
                failed = kind == "sl"  # exactly one alert, to the bouncing mailbox
            else:
                failed = (kind == "sl" and user in SPECIAL) or rng.random() < 0.35
            if user == ROLLED_BACK and kind == "sl":
                _rolled_back_close(conn, report, user, position[0], ticket, price, close)
                continue
            report.updates += 1
            with conn.transaction():
                conn.execute(
                    q["close_position"],
                    {
                        "id": position[0],
                        "close_price": close,
                        "state": f"{kind}_close_failed" if failed else "closed",
                    },
                )
                if failed:
                    report.failures += 1
                    pnl = abs(close - price) * volume
                    amount = "loss_amount" if kind == "sl" else "profit_amount"
                    _alert(
                        conn,
                        report,
                        user,
                        f"position_failure_{kind}",
                        {
                            "instrument": instrument,
                            "side": side,
                            "entry_price": _price(price, move),
                            "current_price": _price(close, move),
                            amount: f"{pnl:,.2f}",
                            "broker_ticket": ticket,
                            "currency": "USD",
                        },
                        f"{kind}-close-failed-{ticket}",
                    )
        report.updates += 1
        approval = f"APR-{number:04d}"
        with conn.transaction():
            order = conn.execute(
                q["place_order"],
                {
                    "user_id": user,
                    "instrument": instrument,
                    "side": side,
                    "volume": volume,
                    "price": price,
                    "approval_id": approval,
                },
            ).fetchone()
            assert order is not None
            rejected = user != ALERT_BOUNCE and rng.random() < 0.4
            reason = rng.choice(ENTRY_REJECTIONS) if rejected else None
            conn.execute(
                q["settle_order"],
                {"id": order[0], "state": "rejected" if rejected else "filled", "reason": reason},
            )
            if rejected:
                report.failures += 1
                _alert(
                    conn,
                    report,
                    user,
                    "position_failure_entry",
                    {
                        "instrument": instrument,
                        "side": side,
                        "entry_price": _price(price, move),
                        "volume": str(volume),
                        "error_reason": reason,
                        "approval_id": approval,
                    },
                    f"entry-failed-{approval}",
                )
    return report


def _rolled_back_close(
    conn: psycopg.Connection[Any],
    report: TradingReport,
    user: str,
    position_id: int,
    ticket: str,
    entry: Decimal,
    close: Decimal,
) -> None:
    """Write the failure and its alert, then roll the transaction back on purpose."""
    q = queries()
    report.rolled_back_ticket = ticket
    try:
        with conn.transaction():
            conn.execute(
                q["close_position"],
                {"id": position_id, "close_price": close, "state": "sl_close_failed"},
            )
            report.rolled_back_message_id = outbox.enqueue(
                conn,
                user_id=user,
                channel=alert_channel(user),
                template="position_failure_sl",
                vars={
                    "instrument": "EURUSD",
                    "side": "buy",
                    "entry_price": str(entry),
                    "current_price": str(close),
                    "loss_amount": "0.00",
                    "broker_ticket": ticket,
                },
                idempotency_key=f"sl-close-failed-{ticket}",
            )
            raise BrokerConfirmedAfterAll(ticket)
    except BrokerConfirmedAfterAll:
        pass
    with conn.transaction():
        row = conn.execute(q["message_exists"], {"id": report.rolled_back_message_id}).fetchone()
        state = conn.execute(q["position_state"], {"broker_ticket": ticket}).fetchone()
    report.rolled_back_exists_after = int(row[0]) if row else -1
    report.rolled_back_position_state = str(state[0]) if state else "?"
