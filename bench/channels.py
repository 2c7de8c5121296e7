"""``python -m bench channels``: the real channels against real loopback servers.

The servers are the test suite's (``outbox.testing``): an aiosmtpd SMTP server, a Bot
API server that answers 429 above 30 messages/s per bot and 1/s per chat (like
Telegram), and a Web Push service over TLS that verifies VAPID and decrypts every
``aes128gcm`` body. Dispatchers are real ``outbox dispatch`` processes using the
production channels (``outbox.testing.plugins`` only makes them trust the
throwaway CA).

1. Throughput: rate limits off, one dispatcher drains ``--count`` messages per
   channel: messages/s per dispatcher (email reuses its SMTP connection).
2. Limits: ``--dispatchers`` dispatchers share the configured limits
   (``--limits``) while draining ``--seconds`` worth of messages per channel. From
   the server-side arrival times: the achieved rate, which must not fall below 0.8
   of the limit, and the busiest window of the limit's own period (or of the whole
   run, when shorter), which must hold no more than the limit allows (+1 at the
   window's edge). The busiest single second is shown too. A burst to one Telegram
   chat checks the 1/s per-chat pace.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench._common import (
    ROOT,
    SEED_ADDRESSES,
    Target,
    Workers,
    add_common_arguments,
    fresh_database,
    print_header,
    report,
    scalar,
    summarize,
    table,
    vacuum,
    write_json,
)
from outbox import add_push_subscription
from outbox._settings import parse_rate_limits

CHANNELS = ("email", "telegram", "push")
TOKEN = "123456789:AAE-bench-token_0123456789abcdefghijkl"
SENDER = "alerts@outbox.test"
ALERT = (
    "jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',"
    " 'trigger_price', (1 + g / 1e6)::text, 'current_price', '1.08600')"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench channels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--count",
        type=int,
        default=1000,
        help="messages per channel, throughput phase (%(default)s)",
    )
    parser.add_argument(
        "--limits",
        default="email=1200/m,telegram=20/s,telegram_chat=1/s,push=100/s",
        help="OUTBOX_RATE_LIMITS of the limits phase",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="limits phase: seconds of traffic per channel (%(default)s)",
    )
    parser.add_argument(
        "--dispatchers",
        type=int,
        default=2,
        help="limits phase: dispatchers sharing the limits (%(default)s)",
    )
    parser.add_argument("--users", type=int, default=2000, help="(%(default)s)")
    parser.add_argument(
        "--burst", type=int, default=5, help="messages to one Telegram chat (%(default)s)"
    )
    parser.add_argument("--keep-logs", metavar="DIR", help="write the dispatchers' logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.seconds, args.rounds, args.users = 40, 1.0, 1, 100
        args.burst = 3
    return args


class Servers:
    """The three loopback servers and what a dispatcher needs to reach them."""

    def __init__(self) -> None:
        from outbox.testing.push import PushServer, VapidKeys
        from outbox.testing.smtp import SmtpServer
        from outbox.testing.telegram import TelegramServer

        self.smtp = SmtpServer().start()
        # Telegram's own limits (429 above them) for the limits phase; none for the
        # throughput phase, which measures what one dispatcher can push through
        self.telegram_limited = TelegramServer(
            token=TOKEN, rate_limit_per_second=30, chat_rate_limit_per_second=1
        ).start()
        self.telegram_free = TelegramServer(token=TOKEN).start()
        self.telegram = self.telegram_free
        self.push = PushServer(tls=True).start()
        self.keys = VapidKeys.generate()

    def env(self, url: str, limits: str) -> dict[str, str]:
        from outbox.testing.tls import shared_environment

        self.telegram = self.telegram_free if limits == "off" else self.telegram_limited
        return {
            **os.environ,
            **shared_environment(),
            "OUTBOX_DATABASE_URL": url,
            "OUTBOX_SMTP_HOST": self.smtp.host,
            "OUTBOX_SMTP_PORT": str(self.smtp.port),
            "OUTBOX_SMTP_FROM": SENDER,
            "OUTBOX_TELEGRAM_BOT_TOKEN": TOKEN,
            "OUTBOX_TELEGRAM_API_URL": self.telegram.url,
            "OUTBOX_VAPID_PRIVATE_KEY": self.keys.private_raw,
            "OUTBOX_VAPID_PUBLIC_KEY": self.keys.public_raw,
            "OUTBOX_VAPID_SUBJECT": "mailto:ops@outbox.test",
            "OUTBOX_PUSH_ALLOWED_HOSTS": self.push.host,
            "OUTBOX_CHANNEL_PLUGINS": "email=outbox.testing.plugins:email_channel,"
            "telegram=outbox.testing.plugins:telegram_channel,"
            "push=outbox.testing.plugins:push_channel",
            "OUTBOX_RATE_LIMITS": limits,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }

    def arrivals(self, channel: str) -> list[float]:
        """Arrival times (seconds, any origin) of everything the server accepted."""
        if channel == "email":
            return sorted(m.received_at for m in self.smtp.messages)
        if channel == "telegram":
            return sorted(m.received_at for m in self.telegram.messages)
        return sorted(m.received_at for m in self.push.messages)

    def clear(self) -> None:
        for server in (self.smtp, self.telegram_free, self.telegram_limited, self.push):
            server.clear()

    def stop(self) -> None:
        for server in (self.smtp, self.telegram_free, self.telegram_limited, self.push):
            server.stop()


def seed_users(url: str, servers: Servers, users: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_ADDRESSES, {"users": users, "chat_offset": 1000})
        for i in range(1, users + 1):
            subscriber = servers.push.subscribe(application_server_key=servers.keys.public_raw)
            add_push_subscription(conn, f"u{i}", subscriber.info)


def seed(url: str, channel: str, count: int, users: int, *, same_user: bool = False) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars)"
            f" SELECT 'transactional', 0, %s, 'u' || CASE WHEN %s THEN 1 ELSE 1 + g %% %s END,"
            f"        'price_alert', {ALERT} FROM generate_series(1, %s) g",
            [channel, same_user, users, count],
        )
    vacuum(url, "outbox.message", "outbox.attempt")


def drain(url: str, env: dict[str, str], processes: int, logs: Path) -> float:
    """Run dispatchers until idle; return the seconds from go to the last exit."""
    workers = Workers([["outbox", "--until-idle"]] * processes, env, logs)
    try:
        workers.ready()
        started = workers.go()
        return workers.wait(timeout=900) - started
    except BaseException:
        workers.kill()
        raise


def busiest(times: Sequence[float], window: float = 1.0) -> int:
    """The most arrivals in any window of ``window`` seconds."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def limit_window(per_seconds: float, times: Sequence[float]) -> float:
    """The limit's own period, or the whole run when that is shorter (a per-minute
    limit promises nothing about single seconds)."""
    return min(per_seconds, max(1.0, times[-1] - times[0] + 1e-6))


def check_done(url: str, channel: str, expected: int) -> None:
    left = int(scalar(url, "SELECT count(*) FROM outbox.message"))
    sent = int(
        scalar(
            url,
            "SELECT count(*) FROM outbox.attempt WHERE outcome = 'sent' AND channel = %s",
            [channel],
        )
    )
    if left or sent != expected:
        raise RuntimeError(
            f"{channel}: {sent} of {expected} sent, {left} left in the queue (see the worker logs)"
        )


def run(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    limits = parse_rate_limits(args.limits)
    results: dict[str, Any] = {
        "throughput": {c: [] for c in CHANNELS},
        "limited": {c: [] for c in CHANNELS},
        "chat_gap": [],
    }
    servers = Servers()
    try:
        with fresh_database(args.database_url, "channels") as url:
            seed_users(url, servers, args.users)
            for round_ in range(1, args.rounds + 1):
                for channel in CHANNELS:
                    servers.clear()
                    seed(url, channel, args.count, args.users)
                    seconds = drain(url, servers.env(url, "off"), 1, logs)
                    check_done(url, channel, args.count)
                    rate = args.count / seconds
                    results["throughput"][channel].append(rate)
                    print(
                        f"  round {round_}: {channel} unlimited, 1 dispatcher: {rate:,.0f}/s",
                        flush=True,
                    )
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("TRUNCATE outbox.attempt")
                for channel in CHANNELS:
                    limit = limits[channel].per_second
                    count = max(3, int(limit * args.seconds))
                    servers.clear()
                    seed(url, channel, count, args.users)
                    drain(url, servers.env(url, args.limits), args.dispatchers, logs)
                    check_done(url, channel, count)
                    times = servers.arrivals(channel)
                    rate = (len(times) - 1) / (times[-1] - times[0])
                    window = limit_window(limits[channel].per_seconds, times)
                    results["limited"][channel].append(
                        (rate, busiest(times), busiest(times, window), window)
                    )
                    print(
                        f"  round {round_}: {channel} limit {limit:g}/s, {args.dispatchers}"
                        f" dispatchers: {rate:.2f}/s, busiest second {busiest(times)},"
                        f" busiest {window:.0f} s window {busiest(times, window)}",
                        flush=True,
                    )
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("TRUNCATE outbox.attempt")
                servers.clear()
                seed(url, "telegram", args.burst, args.users, same_user=True)
                drain(url, servers.env(url, args.limits), args.dispatchers, logs)
                check_done(url, "telegram", args.burst)
                times = servers.arrivals("telegram")
                gap = min(b - a for a, b in itertools.pairwise(times))
                results["chat_gap"].append(gap)
                print(
                    f"  round {round_}: {args.burst} messages to one chat: smallest gap"
                    f" {gap:.3f} s",
                    flush=True,
                )
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("TRUNCATE outbox.attempt")
    finally:
        servers.stop()
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "channels",
        args,
        f"throughput: {args.count} messages per channel,"
        f" 1 dispatcher; limits {args.limits} shared by {args.dispatchers}"
        f" dispatchers, {args.seconds:g} s per channel; rounds {args.rounds}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(args.keep_logs) if args.keep_logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = run(args, logs)
    limits = parse_rate_limits(args.limits)
    rows = []
    for channel in CHANNELS:
        rate = summarize(results["throughput"][channel])
        rows.append([channel, rate.cell(), f"{rate.spread:.0%}"])
    print(
        table(
            ["channel", "messages/s per dispatcher, median (min..max)", "spread"],
            rows,
            "Throughput, rate limits off",
        )
    )
    rows = []
    targets = []
    for channel in CHANNELS:
        limit = limits[channel].per_second
        runs = results["limited"][channel]
        rate = summarize([r[0] for r in runs])
        second = max(r[1] for r in runs)
        # the worst round against what the limit allows in its own window (+1 at the edge)
        used, window = max(((r[2], r[3]) for r in runs), key=lambda x: x[0] / (limit * x[1]))
        allowed = limit * window + 1
        rows.append(
            [
                channel,
                str(args.limits.split(f"{channel}=")[1].split(",")[0]),
                rate.cell("{:.2f}"),
                f"{rate.median / limit:.2f}",
                second,
                f"{used} / {allowed:.0f} in {window:.0f} s",
            ]
        )
        targets.append(
            Target(f"{channel}: busiest window / allowed", used / allowed, 1.0, at_least=False)
        )
        targets.append(Target(f"{channel}: rate / limit", rate.median / limit, 0.8))
    print(
        table(
            [
                "channel",
                "limit",
                "achieved /s median (min..max)",
                "/ limit",
                "busiest 1 s",
                "busiest window / allowed",
            ],
            rows,
            f"Limits held across {args.dispatchers} dispatchers",
        )
    )
    gap = min(results["chat_gap"])
    chat_limit = limits["telegram_chat"].per_second
    print(
        f"\nOne Telegram chat, limit {chat_limit:g}/s: smallest gap between two messages"
        f" {gap:.3f} s"
    )
    targets.append(Target("telegram chat: smallest gap x limit", gap * chat_limit, 0.95))
    write_json(args.json, {"machine": facts, "args": vars(args), "results": results})
    return report(targets, check=args.check, quick=args.quick)
