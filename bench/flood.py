"""``python -m bench flood``: stop-loss alerts while a 1,000,000-message campaign drains.

Setup, before any dispatcher runs: ``--messages`` campaign messages (lane
``campaign``, channel push, one template and one set of vars for everybody, as a
marketing campaign is) written with ``outbox.enqueue_campaign`` in one transaction,
to ``--users`` recipients in turn. Then the real ``outbox dispatch --processes 2``
(one supervisor, two dispatcher processes) drains it to a sink channel that accepts
every message at once and records when (``bench._sink``), while a producer commits
one stop-loss alert (``position_failure_sl``, lane ``transactional``, push) every
``--alert-interval-ms`` in a transaction of its own, through ``outbox.enqueue``.

Reported, for the alerts committed while campaign messages were still left:
commit (``commit()`` returned in the producer) to provider-accepted (the sink's
``send``) p50, p99 and max, both clocks ``time.time()`` on this machine; the
campaign's drain rate (messages/s from its first send to its last); the machine,
its load and the versions. Targets: alert p99 <= 50 ms; every alert delivered.

``--breakdown`` splits each alert's latency in three: from its commit to the start
of the claim that leased it (waiting for the next claim), the claim statement itself,
and from the claim's end to the send. An ``AFTER UPDATE`` trigger on
``outbox.message``, created in the benchmark's own database, writes for each alert a
claim leases ``now()`` (the claim's start) and ``clock_timestamp()`` (the end of the
claim statement, where after triggers run), and how many rows that claim leased, which tells the
dispatcher's urgent claim (the transactional lane alone) from a regular batch. It is
a statement trigger with transition tables (one call per claim, heartbeat or
finish statement, the rows kept in memory for it): a cost that runs with and
without the urgent claim alike, and only with ``--breakdown``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import outbox
from bench._common import (
    OUTBOX,
    ROOT,
    Target,
    add_common_arguments,
    dispatcher_env,
    fresh_database,
    percentile,
    print_header,
    report,
    seed_recipients,
    summarize,
    table,
    vacuum,
    write_json,
)

P99_GOAL_MS = 50.0
SMALL_CLAIM_ROWS = 25
"""A claim of at most this many rows is the dispatcher's urgent claim (its default
``--urgent-reserve``); a regular claim under the flood leases a batch of 100."""
CAMPAIGN_VARS = {
    "instrument": "EURUSD",
    "condition": "above",
    "trigger_price": "1.0850",
    "current_price": "1.0852",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, rounds=1)
    parser.add_argument(
        "--messages", type=int, default=1_000_000, help="campaign messages (%(default)s)"
    )
    parser.add_argument(
        "--alert-interval-ms",
        type=float,
        default=1000.0,
        help="one stop-loss alert every this many ms (%(default)s)",
    )
    parser.add_argument(
        "--alerts",
        type=int,
        default=None,
        help="stop after this many alerts (default: until the campaign has drained)",
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="outbox dispatch --processes (%(default)s)"
    )
    parser.add_argument(
        "--users", type=int, default=10_000, help="campaign recipients (%(default)s)"
    )
    parser.add_argument(
        "--dispatch-args",
        default="",
        help="extra flags for outbox dispatch, e.g. '--batch-size 50'",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="split each alert's latency at its claim (a trigger in the benchmark's"
        " database notes when the claim that leased it started and ended)",
    )
    parser.add_argument(
        "--vacuum-every-s",
        type=float,
        default=None,
        help="VACUUM outbox.message this often while the campaign drains: what autovacuum"
        " does (the migrations ask for it after 10,000 dead rows) on a server where it is"
        " off, as on the test server (the header shows the setting)",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=3600.0,
        help="give up when the campaign has not drained by then (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.alert_interval_ms, args.rounds = 20_000, 100.0, 1
        args.users = min(args.users, 1000)
    if args.messages < 1 or args.processes < 1 or args.alert_interval_ms <= 0:
        parser.error("--messages, --processes and --alert-interval-ms must be positive")
    return args


@dataclass
class Round:
    """What one round measured."""

    messages: int
    campaign_delivered: int = 0
    drain_seconds: float = 0.0
    rate: float = 0.0
    alerts_committed: int = 0
    alerts_delivered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    """Of the alerts committed while campaign messages were left."""
    after_flood: int = 0
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    supervisor_exit: int | None = None
    breakdown_ms: dict[str, list[float]] = field(default_factory=dict)
    alert_offsets_s: list[float] = field(default_factory=list)
    """Seconds from the campaign's first send to each alert's commit (latencies_ms order)."""
    background: dict[str, int] = field(default_factory=dict)
    """What PostgreSQL did meanwhile: autovacuums and checkpoints during the drain."""
    vacuums: int = 0
    """VACUUMs run by --vacuum-every-s."""
    """With --breakdown: 'to claim', 'claim', 'claim to send' of each alert in the flood."""
    claim_rows: list[int] = field(default_factory=list)
    """With --breakdown: how many rows the claim that leased each alert leased."""


class AlertProducer(threading.Thread):
    """Commits one stop-loss alert every ``interval`` seconds, each in its own transaction."""

    def __init__(self, url: str, interval: float, limit: int | None, users: int) -> None:
        super().__init__(daemon=True, name="alert-producer")
        self.url, self.interval, self.limit, self.users = url, interval, limit, users
        self.stopping = threading.Event()
        self.committed: dict[int, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.url) as conn:
                due = time.monotonic()
                n = 0
                while not self.stopping.is_set() and (self.limit is None or n < self.limit):
                    if self.stopping.wait(max(0.0, due - time.monotonic())):
                        break
                    n += 1
                    message_id = outbox.enqueue(
                        conn,
                        user_id=f"u{1 + n % self.users}",
                        channel="push",
                        template="position_failure_sl",
                        vars={
                            "instrument": "XAUUSD",
                            "side": "buy",
                            "entry_price": "2315.40",
                            "current_price": f"{2290 - n % 50:.2f}",
                            "loss_amount": f"{250 + n:.2f}",
                            "broker_ticket": f"T{n}",
                            "currency": "USD",
                        },
                    )
                    conn.commit()
                    self.committed[message_id] = time.time()
                    due += self.interval
        except BaseException as error:  # reported by the main thread
            self.error = error


class Vacuumer(threading.Thread):
    """``VACUUM outbox.message`` every ``interval`` seconds (``--vacuum-every-s``)."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True, name="vacuumer")
        self.url, self.interval = url, interval
        self.stopping = threading.Event()
        self.runs = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stopping.wait(self.interval):
                conn.execute("VACUUM outbox.message")
                self.runs += 1


def enqueue_campaign(url: str, messages: int, users: int) -> tuple[int, int]:
    """The campaign, in one transaction; its first and last message id."""
    user_ids = (f"u{1 + i % users}" for i in range(messages))
    with psycopg.connect(url) as conn:
        result = outbox.enqueue_campaign(
            conn, user_ids, channel="push", template="price_alert", vars=CAMPAIGN_VARS
        )
        conn.commit()
        row = conn.execute("SELECT min(id), max(id), count(*) FROM outbox.message").fetchone()
    assert row is not None
    first, last, count = (int(v) for v in row)
    if result.enqueued != messages or count != messages or last - first + 1 != messages:
        raise RuntimeError(f"campaign setup wrote {count} rows, ids {first}..{last}")
    return first, last


CLAIM_PROBE = """
CREATE TABLE public.bench_alert_claim (
    id bigint, claim_started timestamptz, claim_ended timestamptz, leased_by text,
    claim_rows bigint
);
CREATE FUNCTION public.bench_note_alert_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE lane = 'transactional' AND status = 'sending') THEN
        INSERT INTO public.bench_alert_claim
        SELECT n.id, now(), clock_timestamp(), n.leased_by,
               (SELECT count(*) FROM new_rows WHERE status = 'sending')
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.lane = 'transactional' AND n.status = 'sending' AND o.status = 'pending';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_note_alert_claim AFTER UPDATE ON outbox.message
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.bench_note_alert_claim();
"""


def alert_claims(url: str) -> dict[int, tuple[float, float, int]]:
    """Alert id -> (claim start, claim statement end, rows the claim leased), unix
    seconds, first claim only."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, extract(epoch FROM claim_started)::float8,"
            " extract(epoch FROM claim_ended)::float8, claim_rows"
            " FROM public.bench_alert_claim ORDER BY claim_ended"
        ).fetchall()
    claims: dict[int, tuple[float, float, int]] = {}
    for message_id, started, ended, leased in rows:
        claims.setdefault(int(message_id), (float(started), float(ended), int(leased)))
    return claims


BACKGROUND = """
SELECT (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables
         WHERE schemaname = 'outbox' AND relname = 'message'),
       (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables
         WHERE schemaname = 'outbox' AND relname = 'attempt'),
       (SELECT {checkpoints})
"""
# PostgreSQL 17 moved the checkpoint counters to a view of their own
CHECKPOINTS_BEFORE_17 = "checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
CHECKPOINTS_FROM_17 = "num_timed + num_requested FROM pg_stat_checkpointer"


def background(url: str) -> tuple[int, int, int]:
    """Autovacuums of outbox.message and outbox.attempt, and checkpoints, so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        version = conn.info.server_version
        checkpoints = CHECKPOINTS_FROM_17 if version >= 170000 else CHECKPOINTS_BEFORE_17
        row = conn.execute(BACKGROUND.format(checkpoints=checkpoints)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def campaign_left(conn: psycopg.Connection[Any], first: int, last: int) -> bool:
    """Whether any campaign message is still pending or in flight (an index probe)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM outbox.message WHERE id BETWEEN %s AND %s)", [first, last]
    ).fetchone()
    return bool(row and row[0])


def wait_ready(base: str, supervisor: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise RuntimeError(f"outbox dispatch exited with {supervisor.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(base + "/readyz", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the dispatcher processes did not become ready")


def read_sink(
    path: Path, first: int, last: int, alerts: set[int]
) -> tuple[int, float, float, dict[int, float]]:
    """(distinct campaign messages sent, first and last campaign send, alert id -> send)."""
    seen = bytearray(last - first + 1)
    delivered = 0
    start, end = float("inf"), 0.0
    alert_sent: dict[int, float] = {}
    with open(path, "rb") as sink:
        for line in sink:
            parts = line.split()
            if len(parts) != 2:
                continue
            message_id, at = int(parts[0]), float(parts[1])
            if first <= message_id <= last:
                if not seen[message_id - first]:
                    seen[message_id - first] = 1
                    delivered += 1
                start, end = min(start, at), max(end, at)
            elif message_id in alerts:
                alert_sent.setdefault(message_id, at)
    return delivered, start, end, alert_sent


def one_round(args: argparse.Namespace, number: int) -> Round:
    measured = Round(messages=args.messages)
    with fresh_database(args.database_url, "flood") as url, tempfile.TemporaryDirectory() as tmp:
        seed_recipients(url, args.users)
        setup_started = time.monotonic()
        first, last = enqueue_campaign(url, args.messages, args.users)
        vacuum(url, "outbox.message", "outbox.recipient", "outbox.push_subscription")
        if args.breakdown:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(CLAIM_PROBE)
        print(
            f"  round {number}: campaign of {args.messages:,} enqueued in"
            f" {time.monotonic() - setup_started:.1f}s (enqueue_campaign, one transaction)",
            flush=True,
        )
        sink = Path(tmp) / "sink.txt"
        sink.touch()
        port = _free_port()
        measured.load_before = os.getloadavg()
        before = background(url)
        with open(Path(tmp) / "dispatch.log", "wb") as log:
            supervisor = subprocess.Popen(
                [
                    OUTBOX,
                    "dispatch",
                    "--processes",
                    str(args.processes),
                    "--metrics-port",
                    str(port),
                    *args.dispatch_args.split(),
                ],
                env=dispatcher_env(url, OUTBOX_BENCH_SINK_FILE=str(sink)),
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        producer = AlertProducer(url, args.alert_interval_ms / 1000, args.alerts, args.users)
        vacuumer = Vacuumer(url, args.vacuum_every_s) if args.vacuum_every_s else None
        try:
            wait_ready(f"http://127.0.0.1:{port}", supervisor)
            producer.start()
            if vacuumer is not None:
                vacuumer.start()
            deadline = time.monotonic() + args.drain_timeout_s
            with psycopg.connect(url, autocommit=True) as conn:
                while campaign_left(conn, first, last):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the campaign did not drain in {args.drain_timeout_s}s")
                    if supervisor.poll() is not None:
                        raise RuntimeError(f"outbox dispatch exited with {supervisor.returncode}")
                    time.sleep(0.5)
            producer.stopping.set()
            producer.join(30)
            if vacuumer is not None:
                vacuumer.stopping.set()
                vacuumer.join(120)
                measured.vacuums = vacuumer.runs
            if producer.error is not None:
                raise RuntimeError(f"the alert producer failed: {producer.error!r}")
            alerts = set(producer.committed)
            # the last alerts may still be on their way
            alert_deadline = time.monotonic() + 10
            while True:
                delivered, start, end, alert_sent = read_sink(sink, first, last, alerts)
                if len(alert_sent) == len(alerts) or time.monotonic() > alert_deadline:
                    break
                time.sleep(0.2)
            measured.load_after = os.getloadavg()
            claims = alert_claims(url) if args.breakdown else {}
            after = background(url)
            measured.background = {
                "autovacuum outbox.message": after[0] - before[0],
                "autovacuum outbox.attempt": after[1] - before[1],
                "checkpoints (whole server)": after[2] - before[2],
            }
        finally:
            producer.stopping.set()
            if vacuumer is not None:
                vacuumer.stopping.set()
            if supervisor.poll() is None:
                supervisor.send_signal(signal.SIGTERM)
            try:
                measured.supervisor_exit = supervisor.wait(60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
    measured.campaign_delivered = delivered
    measured.drain_seconds = end - start
    measured.rate = delivered / measured.drain_seconds if measured.drain_seconds > 0 else 0.0
    measured.alerts_committed = len(alerts)
    measured.alerts_delivered = len(alert_sent)
    for message_id, committed_at in sorted(producer.committed.items()):
        if committed_at > end:
            measured.after_flood += 1
        elif message_id in alert_sent:
            sent_at = alert_sent[message_id]
            measured.latencies_ms.append((sent_at - committed_at) * 1000)
            measured.alert_offsets_s.append(committed_at - start)
            if message_id in claims:
                started, ended, leased = claims[message_id]
                measured.claim_rows.append(leased)
                parts = measured.breakdown_ms
                parts.setdefault("to claim", []).append((started - committed_at) * 1000)
                parts.setdefault("claim", []).append((ended - started) * 1000)
                parts.setdefault("claim to send", []).append((sent_at - ended) * 1000)
    lat = measured.latencies_ms
    print(
        f"  round {number}: campaign {delivered:,} in {measured.drain_seconds:.1f}s"
        f" ({measured.rate:,.0f}/s); {len(lat)} alerts during the flood:"
        f" p50 {percentile(lat, 0.5):.1f} ms, p99 {percentile(lat, 0.99):.1f} ms,"
        f" max {max(lat, default=float('nan')):.1f} ms;"
        f" delivered {measured.alerts_delivered}/{measured.alerts_committed};"
        f" load {measured.load_before[0]:.2f} -> {measured.load_after[0]:.2f}",
        flush=True,
    )
    print(
        f"  round {number}: meanwhile "
        + ", ".join(f"{k}: {v}" for k, v in measured.background.items())
        + (f", VACUUM (--vacuum-every-s): {measured.vacuums}" if args.vacuum_every_s else ""),
        flush=True,
    )
    return measured


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    interval = args.alert_interval_ms
    facts = print_header(
        "flood",
        args,
        f"campaign {args.messages:,} push messages to {args.users:,} users,"
        f" outbox dispatch --processes {args.processes} {args.dispatch_args}".rstrip()
        + f", one stop-loss alert every {interval:g} ms, rounds {args.rounds}",
    )
    facts["outbox"] = outbox.__version__
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    facts["autovacuum"] = row[0] if row else "?"
    print(f"autovacuum={facts['autovacuum']}, outbox {facts['outbox']}")
    rounds = [one_round(args, n) for n in range(1, args.rounds + 1)]
    rows = []
    for n, r in enumerate(rounds, 1):
        lat = r.latencies_ms
        rows.append(
            [
                n,
                f"{r.campaign_delivered:,}",
                f"{r.drain_seconds:.1f}",
                f"{r.rate:,.0f}",
                len(lat),
                f"{percentile(lat, 0.5):.1f}",
                f"{percentile(lat, 0.99):.1f}",
                f"{max(lat, default=float('nan')):.1f}",
                f"{r.alerts_delivered}/{r.alerts_committed}",
                f"{r.load_before[0]:.2f} / {r.load_after[0]:.2f}",
            ]
        )
    print(
        table(
            [
                "round",
                "campaign sent",
                "drain s",
                "campaign msgs/s",
                "alerts in flood",
                "alert p50 ms",
                "alert p99 ms",
                "alert max ms",
                "alerts delivered",
                "load 1m before / after",
            ],
            rows,
            "Alert latency under a flood (commit to provider-accepted)",
        )
    )
    if args.breakdown:
        split = [
            [
                n,
                part,
                len(values),
                f"{percentile(values, 0.5):.1f}",
                f"{percentile(values, 0.99):.1f}",
                f"{max(values, default=float('nan')):.1f}",
            ]
            for n, r in enumerate(rounds, 1)
            for part, values in r.breakdown_ms.items()
        ]
        print(
            table(
                ["round", "part of the alert's latency", "alerts", "p50 ms", "p99 ms", "max ms"],
                split,
                "Where the alerts waited (--breakdown)",
            )
        )
        for n, r in enumerate(rounds, 1):
            claims = r.breakdown_ms.get("claim", [])
            quarters = [claims[len(claims) * k // 4 : len(claims) * (k + 1) // 4] for k in range(4)]
            print(
                f"round {n}: the claim statement's p50 by quarter of the drain: "
                + ", ".join(f"{percentile(q, 0.5):.1f}" for q in quarters)
                + " ms"
            )
            small = [rows <= SMALL_CLAIM_ROWS for rows in r.claim_rows]
            print(
                f"round {n}: {sum(small)} of {len(small)} alerts leased by a claim of at most"
                f" {SMALL_CLAIM_ROWS} rows (the urgent claim), {len(small) - sum(small)} in a"
                f" larger batch (median {percentile([float(x) for x in r.claim_rows], 0.5):.0f}"
                " rows a claim)"
            )
    p99 = summarize([percentile(r.latencies_ms, 0.99) for r in rounds])
    delivered = sum(r.alerts_delivered for r in rounds) / max(
        1, sum(r.alerts_committed for r in rounds)
    )
    targets = [
        Target("alert p99 under the flood", p99.median, P99_GOAL_MS, at_least=False, unit=" ms"),
        Target("alerts delivered (fraction)", delivered, 1.0),
    ]
    if any(r.supervisor_exit != 0 for r in rounds):
        print(f"\noutbox dispatch exit status: {[r.supervisor_exit for r in rounds]}")
    write_json(
        args.json,
        {"machine": facts, "args": vars(args), "rounds": [asdict(r) for r in rounds]},
    )
    return report(targets, check=args.check, quick=args.quick)
