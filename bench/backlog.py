"""``python -m bench backlog``: does a big backlog, or a long run, slow the claim down?

1. Claim cost: the time of one ``claim_batch`` (100 messages, rolled back so the
   state stays put) with ``--small`` pending messages, against ``--rows`` pending
   plus ``--rows / 2`` dead letters. Each claim is timed ``--claims`` times per
   round; the figure is the median.
2. Sustained run: ``--dispatchers`` real ``outbox dispatch`` processes drain while a
   producer keeps the backlog topped up (between 20,000 and 40,000 pending), for
   ``--minutes``; the drain rate per minute comes from the attempt log. Autovacuum
   runs with the server's settings: this is the dead-tuple test.

The issue's scale is ``--full`` (2,000,000 pending plus 1,000,000 dead; 10 minutes);
the default is smaller so that the benchmark fits a shared machine.

Targets: claim cost ratio (big / small) <= 1.3; the last minute's drain rate at
least 0.8 of the first minute's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time
import uuid

import psycopg

from bench._common import (
    OUTBOX,
    ROOT,
    Target,
    add_common_arguments,
    dispatcher_env,
    fresh_database,
    print_header,
    report,
    scalar,
    seed_messages,
    seed_recipients,
    summarize,
    table,
    vacuum,
    write_json,
)
from outbox._queries import QUERIES

USERS = 1000
LOW_WATER, HIGH_WATER = 20_000, 40_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench backlog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--small", type=int, default=10_000, help="(%(default)s)")
    parser.add_argument(
        "--rows",
        type=int,
        default=500_000,
        help="pending rows of the big backlog (%(default)s; --full: 2,000,000)",
    )
    parser.add_argument("--claims", type=int, default=200, help="claims timed per round")
    parser.add_argument(
        "--minutes", type=float, default=3.0, help="sustained run (%(default)s; --full: 10)"
    )
    parser.add_argument("--dispatchers", type=int, default=2, help="(%(default)s)")
    parser.add_argument("--full", action="store_true", help="the issue's scale")
    parser.add_argument("--skip-sustained", action="store_true")
    parser.add_argument("--skip-claims", action="store_true")
    parser.add_argument(
        "--vacuum-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sustained run: VACUUM outbox.message this often, standing in for autovacuum"
        " on a server where it is off (default: rely on the server's autovacuum)",
    )
    args = parser.parse_args(argv)
    if args.full:
        args.rows, args.minutes = 2_000_000, 10.0
    if args.quick:
        args.small, args.rows, args.claims, args.rounds = 1000, 5000, 20, 1
        args.minutes = 0.1
    return args


# ------------------------------------------------------------------ claim cost


def time_claims(url: str, count: int) -> float:
    """Median milliseconds of one claim of 100 (each rolled back)."""
    timings = []
    params = {
        "batch_size": 100,
        "priority_from": -32768,
        "priority_below": 32768,
        "expired_limit": 100,
        "lease_seconds": 30,
        "dispatcher_id": "bench",
    }
    with psycopg.connect(url) as conn:
        for _ in range(count):
            started = time.perf_counter()
            conn.execute(QUERIES["claim_batch"], {**params, "lease_token": str(uuid.uuid4())})
            timings.append((time.perf_counter() - started) * 1000)
            conn.rollback()
    return statistics.median(timings)


def claim_cost(args: argparse.Namespace) -> dict[str, list[float]]:
    costs: dict[str, list[float]] = {"small": [], "big": []}
    with fresh_database(args.database_url, "backlog") as url:
        seed_recipients(url, USERS)
        seed_messages(url, args.small, users=USERS)
        vacuum(url, "outbox.message")
        small = [time_claims(url, args.claims) for _ in range(args.rounds)]
        print(f"  {args.small:,} pending: claim {statistics.median(small):.2f} ms", flush=True)
        seed_messages(url, args.rows - args.small, users=USERS)
        seed_messages(url, args.rows // 2, users=USERS, status="dead")
        vacuum(url, "outbox.message")
        big = [time_claims(url, args.claims) for _ in range(args.rounds)]
        print(
            f"  {args.rows:,} pending + {args.rows // 2:,} dead: claim "
            f"{statistics.median(big):.2f} ms",
            flush=True,
        )
        costs["small"], costs["big"] = small, big
    return costs


# ------------------------------------------------------------------ sustained


class TopUp(threading.Thread):
    """Keeps the backlog between LOW_WATER and HIGH_WATER pending messages."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.written = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            with psycopg.connect(self.url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM outbox.message WHERE status = 'pending'"
                ).fetchone()
            pending = int(row[0]) if row else 0
            if pending < LOW_WATER:
                seed_messages(self.url, HIGH_WATER - pending, users=USERS, chunk=10_000)
                self.written += HIGH_WATER - pending
            self.stopping.wait(0.5)


def sustained(args: argparse.Namespace) -> list[float]:
    """Messages sent per minute, minute by minute."""
    seconds = args.minutes * 60
    autovacuum = scalar(args.database_url, "SHOW autovacuum")
    if autovacuum != "on" and args.vacuum_every <= 0:
        print(
            "  note: this server runs with autovacuum off, so nothing vacuums the queue"
            " table during the run (--vacuum-every stands in for autovacuum)",
            flush=True,
        )
    with fresh_database(args.database_url, "sustained") as url:
        seed_recipients(url, USERS)
        seed_messages(url, HIGH_WATER, users=USERS)
        vacuum(url, "outbox.message")
        env = dispatcher_env(url)
        topup = TopUp(url)
        topup.start()
        started = time.time()
        dispatchers = [
            subprocess.Popen(
                [OUTBOX, "dispatch"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.dispatchers)
        ]
        try:
            if args.vacuum_every > 0:
                with psycopg.connect(url, autocommit=True) as conn:
                    while time.time() - started < seconds:
                        time.sleep(min(args.vacuum_every, seconds - (time.time() - started)))
                        if time.time() - started < seconds:
                            conn.execute("VACUUM outbox.message")
            else:
                time.sleep(seconds)
        finally:
            for process in dispatchers:
                process.terminate()
            for process in dispatchers:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            topup.stopping.set()
            topup.join(60)
        window = 60.0 if seconds >= 120 else seconds / 4
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT floor(extract(epoch FROM created_at - to_timestamp(%s)) / %s)::int,"
                "       count(*)"
                "  FROM outbox.attempt WHERE outcome = 'sent' GROUP BY 1 ORDER BY 1",
                [started, window],
            ).fetchall()
            dead_tuples = conn.execute(
                "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables"
                " WHERE relid = 'outbox.message'::regclass"
            ).fetchone()
        per_window = {int(k): int(n) for k, n in rows}
        windows = int(seconds // window)
        rates = [per_window.get(i, 0) / window for i in range(windows)]
        print(
            f"  per {window:g} s window, messages/s: " + ", ".join(f"{r:,.0f}" for r in rates),
            flush=True,
        )
        print(
            f"  outbox.message afterwards: n_dead_tup={dead_tuples[0] if dead_tuples else '?'},"
            f" autovacuum runs={dead_tuples[1] if dead_tuples else '?'}"
        )
        return rates


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "backlog",
        args,
        f"claim: {args.small:,} vs {args.rows:,} pending +"
        f" {args.rows // 2:,} dead, {args.claims} claims x {args.rounds}"
        f" rounds; sustained: {args.minutes:g} min, {args.dispatchers}"
        " dispatchers",
    )
    targets: list[Target] = []
    costs: dict[str, list[float]] = {}
    if not args.skip_claims:
        costs = claim_cost(args)
        small, big = summarize(costs["small"]), summarize(costs["big"])
        print(
            table(
                ["backlog", "claim of 100, ms median (min..max over rounds)", "spread"],
                [
                    [f"{args.small:,} pending", small.cell("{:.2f}"), f"{small.spread:.0%}"],
                    [
                        f"{args.rows:,} pending + {args.rows // 2:,} dead",
                        big.cell("{:.2f}"),
                        f"{big.spread:.0%}",
                    ],
                ],
                "Claim cost",
            )
        )
        targets.append(
            Target(
                "claim cost, big / small", big.median / small.median, 1.3, at_least=False, unit="x"
            )
        )
    rates: list[float] = []
    if not args.skip_sustained:
        rates = sustained(args)
        if len(rates) >= 2 and rates[0] > 0:
            print(
                table(
                    ["window", "messages/s"],
                    [[i + 1, f"{r:,.0f}"] for i, r in enumerate(rates)],
                    "Sustained produce-and-drain",
                )
            )
            targets.append(Target("last window / first window", rates[-1] / rates[0], 0.8))
    write_json(
        args.json,
        {"machine": facts, "args": vars(args), "claim_ms": costs, "sustained_rates": rates},
    )
    return report(targets, check=args.check, quick=args.quick)
