"""``python -m bench claims``: the claim of two schema revisions, side by side.

Issue 17 moved recipients' addresses from one column per channel (``outbox.recipient``
``email``, ``telegram_chat_id`` and their states) to rows of
``outbox.recipient_address`` (revision ``outbox_0010``), so the claim, which returns
each message with its recipient, now aggregates that user's address rows. Does that
make the claim dearer?

Two databases on the same server: ``previous`` migrated to ``--previous``
(``outbox_0009``, the last revision before the change) and ``head`` to the newest.
Each runs the claim statement of its own time: head's ``claim_batch`` from
``sql/queries.sql``, the previous one frozen in ``bench/claim_batch.outbox_0009.sql``
(copied from the commit before the change). Both hold the same recipients (``--users``,
each with an email address, a Telegram chat and a push subscription) and the same
messages (push price alerts, each with its own prices, as ``bench drain`` seeds them).
Three measurements, the claim being what ``bench drain`` and ``bench backlog`` time:

- ``drain``: ``--drain`` pending messages claimed 100 at a time, each batch committed
  and its rows deleted (as the acknowledgement does), until none is left: the claim's
  time per message;
- ``small`` and ``big`` backlog: one claim of 100 rolled back (the state stays put),
  timed ``--claims`` times, the median; with ``--small`` pending, then with ``--rows``
  pending plus ``--rows / 2`` dead letters (``bench backlog``'s claim cost).

Every round measures each revision twice, in the order previous, head, head, previous
(head, previous, previous, head in even rounds), so that a drift within the round
weighs on both alike and the two runs of the same thing say how far a measurement
strays by chance (the noise). Target: head / previous at most 1 + noise, for each.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.string import TextLoader

from bench._common import (
    Target,
    add_common_arguments,
    fresh_database,
    print_header,
    report,
    scalar,
    seed_messages,
    seed_recipients,
    table,
    vacuum,
    write_json,
)
from outbox._migrate import VERSION_TABLE, upgrade
from outbox._queries import QUERIES

PREVIOUS, HEAD = "previous", "head"
PREVIOUS_CLAIM = Path(__file__).with_name("claim_batch.outbox_0009.sql")
BATCH = 100
PARAMS = {
    "batch_size": BATCH,
    "priority_from": -32768,  # head's claim takes a range of lanes; this is all of them
    "priority_below": 32768,
    "expired_limit": BATCH,
    "lease_seconds": 30,
    "dispatcher_id": "bench",
}
MEASUREMENTS = ("drain", "small", "big")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench claims",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, rounds=3)
    parser.add_argument(
        "--previous", default="outbox_0009", help="the earlier revision (%(default)s)"
    )
    parser.add_argument("--users", type=int, default=1000, help="recipients (%(default)s)")
    parser.add_argument(
        "--drain", type=int, default=20_000, help="messages drained per run (%(default)s)"
    )
    parser.add_argument("--small", type=int, default=10_000, help="(%(default)s)")
    parser.add_argument(
        "--rows", type=int, default=200_000, help="pending rows of the big backlog (%(default)s)"
    )
    parser.add_argument(
        "--claims", type=int, default=100, help="claims timed per backlog run (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.drain, args.small, args.rows, args.claims = 100, 500, 500, 2000, 10
        args.rounds = 1
    return args


def statements(previous_revision: str) -> dict[str, str]:
    if previous_revision != "outbox_0009":
        raise SystemExit(
            f"the frozen previous claim is outbox_0009's ({PREVIOUS_CLAIM.name});"
            f" {previous_revision} would need its own"
        )
    return {PREVIOUS: PREVIOUS_CLAIM.read_text(), HEAD: QUERIES["claim_batch"]}


def claim(conn: psycopg.Connection, sql: str) -> list[tuple[object, ...]]:
    """One claim, fetched as the dispatcher fetches it (json columns as text)."""
    cursor = conn.cursor()
    cursor.adapters.register_loader("json", TextLoader)
    cursor.execute(sql, {**PARAMS, "lease_token": str(uuid.uuid4())})  # type: ignore[arg-type]
    return cursor.fetchall()


def drain_micros(url: str, sql: str, count: int, users: int) -> float:
    """Claim time per message while draining ``count`` fresh messages."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox.message, outbox.attempt")
    seed_messages(url, count, users=users)
    vacuum(url, "outbox.message")
    spent, claimed = 0.0, 0
    with psycopg.connect(url) as conn:
        while True:
            started = time.perf_counter()
            rows = claim(conn, sql)
            spent += time.perf_counter() - started
            conn.commit()
            if not rows:
                break
            claimed += len(rows)
            conn.execute("DELETE FROM outbox.message WHERE id = ANY(%s)", [[r[0] for r in rows]])
            conn.commit()
    if claimed != count:
        raise RuntimeError(f"drained {claimed} of {count} messages")
    return spent / count * 1e6


def backlog_millis(url: str, sql: str, claims: int) -> float:
    """Median milliseconds of one claim of 100, each rolled back."""
    timings = []
    with psycopg.connect(url) as conn:
        claim(conn, sql)  # the session plans the statement once, as a dispatcher does
        conn.rollback()
        for _ in range(claims):
            started = time.perf_counter()
            rows = claim(conn, sql)
            timings.append((time.perf_counter() - started) * 1000)
            conn.rollback()
            if len(rows) != BATCH:
                raise RuntimeError(f"a claim found {len(rows)} messages, not {BATCH}")
    return statistics.median(timings)


def round_order(round_: int) -> list[str]:
    return [PREVIOUS, HEAD, HEAD, PREVIOUS] if round_ % 2 else [HEAD, PREVIOUS, PREVIOUS, HEAD]


Figures = dict[str, dict[str, list[list[float]]]]
"""measurement -> revision -> per round, its two runs."""


def run(args: argparse.Namespace, urls: dict[str, str], sql: dict[str, str]) -> Figures:
    figures: Figures = {m: {PREVIOUS: [], HEAD: []} for m in MEASUREMENTS}

    def measure(measurement: str, one: object) -> None:
        for round_ in range(1, args.rounds + 1):
            runs: dict[str, list[float]] = {PREVIOUS: [], HEAD: []}
            for revision in round_order(round_):
                value = one(revision)  # type: ignore[operator]
                runs[revision].append(value)
                print(f"  round {round_}: {measurement:5s} {revision:8s} {value:9.2f}", flush=True)
            for revision, values in runs.items():
                figures[measurement][revision].append(values)

    measure("drain", lambda r: drain_micros(urls[r], sql[r], args.drain, args.users))
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox.message, outbox.attempt")
        seed_messages(url, args.small, users=args.users)
        vacuum(url, "outbox.message")
    measure("small", lambda r: backlog_millis(urls[r], sql[r], args.claims))
    for url in urls.values():
        seed_messages(url, args.rows - args.small, users=args.users)
        seed_messages(url, args.rows // 2, users=args.users, status="dead")
        vacuum(url, "outbox.message")
    measure("big", lambda r: backlog_millis(urls[r], sql[r], args.claims))
    return figures


def ratios(figures: Figures, measurement: str) -> tuple[list[float], list[float]]:
    """head / previous per round (each the mean of its two runs), and the noise
    ratios: second run / first run of the same revision, both revisions, every round."""
    by = figures[measurement]
    per_round = [
        statistics.fmean(h) / statistics.fmean(p)
        for p, h in zip(by[PREVIOUS], by[HEAD], strict=True)
    ]
    repeats = [runs[1] / runs[0] for revision in (PREVIOUS, HEAD) for runs in by[revision]]
    return per_round, repeats


UNITS = {"drain": "us/message", "small": "ms/claim", "big": "ms/claim"}
LABELS = {
    "drain": "drain: claim time per message",
    "small": "small backlog: one claim of 100",
    "big": "big backlog: one claim of 100",
}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sql = statements(args.previous)
    facts = print_header("claims", args)
    with (
        fresh_database(args.database_url, "claims_prev", migrate=False) as previous,
        fresh_database(args.database_url, "claims_head", migrate=False) as head,
    ):
        urls = {PREVIOUS: previous, HEAD: head}
        upgrade(previous, args.previous)
        upgrade(head)
        for revision, url in urls.items():
            found = scalar(url, f"SELECT version_num FROM {VERSION_TABLE}")
            print(f"  {revision}: {found}", flush=True)
            seed_recipients(url, args.users)
        if scalar(previous, "SELECT to_regclass('outbox.recipient_address')") is not None:
            raise SystemExit(f"{args.previous} already has outbox.recipient_address")
        figures = run(args, urls, sql)

    rows, targets = [], []
    for measurement in MEASUREMENTS:
        per_round, repeats = ratios(figures, measurement)
        noise = max(abs(r - 1) for r in repeats)
        median = statistics.median(per_round)
        cells = {
            revision: statistics.median(v for runs in figures[measurement][revision] for v in runs)
            for revision in (PREVIOUS, HEAD)
        }
        rows.append(
            [
                LABELS[measurement],
                UNITS[measurement],
                f"{cells[PREVIOUS]:,.2f}",
                f"{cells[HEAD]:,.2f}",
                f"{median:.3f}",
                f"{min(per_round):.3f}..{max(per_round):.3f}",
                f"±{noise:.1%}",
            ]
        )
        targets.append(Target(f"{measurement}: head / previous", median, 1 + noise, at_least=False))
    print(
        table(
            [
                "claim",
                "unit",
                f"previous ({args.previous}) median",
                "head median",
                "head / previous",
                "per round",
                "noise",
            ],
            rows,
            f"Claim cost, {args.previous} against head, side by side",
        )
    )
    print(
        "\nnoise: the largest deviation from 1 of second run / first run of the same"
        " revision in the same round; the target for each: head / previous <= 1 + noise"
    )
    write_json(args.json, {"machine": facts, "args": vars(args), "figures": figures})
    return report(targets, check=args.check, quick=args.quick)
