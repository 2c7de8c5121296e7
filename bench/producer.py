"""``python -m bench producer``: what the outbox costs the trading code's transactions.

Section ``dispatch`` (issue 18: "a producer at the price of a plain insert"): three
transactions, each run by 8 and 32 concurrent connections (``--clients``) for
``--seconds`` (pgbench, so the client is not the bottleneck), once with no dispatcher
and once with one running (``--dispatchers 0,1``):

- ``business``: one business-row insert (an order) and commit;
- ``plain_insert``: the same insert plus a plain insert of the row ``enqueue`` writes
  into ``bench_message``, a table of ``outbox.message``'s shape (its columns and
  defaults, an identity key and an index equal to the claim index
  ``message_claim_idx``): the price of the reference, what any outbox table costs;
- ``enqueue``: the same insert plus ``outbox.enqueue(...)`` (its input rules, its
  channel check, its wakeup of a sleeping dispatcher, ``outbox.message``'s own
  constraints and indexes);
- ``naive`` (only with ``--variants``): ``enqueue`` plus a ``pg_notify`` in every
  transaction, the wakeup the design rejects (NOTIFY takes a global lock at commit);
- ``plain_consumed`` (only with ``--variants``): ``plain_insert`` while a bare
  consumer process deletes what it inserts, 100 rows a statement in the claim
  index's order (``FOR UPDATE SKIP LOCKED``), pausing 5 ms after a short batch: the
  least any delivery does with the rows on the same cores (no recipient, no render,
  no send, no attempt log), so ``enqueue`` with a dispatcher against it separates
  what delivering costs the producers from what outbox adds.

Variants are interleaved within each round so that noise from the shared machine
lands on all of them alike; ratios are taken per round (same round, connections and
dispatchers) and their median is the figure. With a dispatcher, every run starts
from an empty queue (it drains ``outbox.message``); ``bench_message`` and, without a
dispatcher, ``outbox.message`` are emptied before every run.

Goal: ``enqueue`` / ``plain_insert`` at least 0.95 at 32 connections with a
dispatcher running.

Then what the second wave's options cost a producer (section ``revisions``): two
databases side by side, one at the previous schema revision (``--previous``,
``outbox_0007``: before the second wave) and one at head (``--head``, the newest
revision; ``outbox_0008`` brought ``expires_at``, ``collapse_key``,
``escalate_after`` and ``enqueued_by``), no dispatcher (queue, log and order table are emptied and
vacuumed before every run):

- ``business`` on both databases: for scale (what the rest of the transaction costs);
- ``enqueue`` without the new options on both, twice per round in the order
  previous, head, head, previous (head, previous, previous, head in even rounds):
  what the revision costs a producer that does not use them. The two runs of the
  same thing also measure the noise: how far a second run strays from the first;
- ``enqueue`` at head with ``expires_at``, with ``collapse_key`` (the queue is not
  drained, so from a user's second message on every enqueue withdraws one) and
  with ``escalate_after``, against plain enqueue at head.

Each is measured twice: as pgbench transactions per second (``--revision-clients``
connections) and as microseconds per call in a server-side loop (a ``DO`` block of
``--loop-calls`` calls in one transaction, rolled back, after a warm-up; the fastest
of ``--loop-repeats`` loops per round, the one least disturbed by the rest of the
machine), which leaves out the round trip and the commit and so shows the
function's own cost. Ratios are per round; a verdict
compares the median ratio with the noise (the largest deviation from 1 of the
second-run / first-run ratios, or half the spread of the ratio's own rounds if
that is larger).

Last, what a dispatcher's lingering saves producers that commit steadily below
saturation (section ``linger``): ``enqueue`` transactions at a fixed rate
(``--linger-rate`` per second over ``--linger-clients`` connections, pgbench ``-R``,
``--seconds`` per run) while one dispatcher runs with ``OUTBOX_LINGER_SECONDS=0``
(it sleeps on LISTEN whenever a claim finds nothing, so most commits find it asleep
and send a NOTIFY) and with the default, interleaved in every round. Reported: the
producers' transaction latency (pgbench's average and standard deviation) and the
NOTIFYs their commits sent per transaction (a listener counts them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    seed_recipients,
    summarize,
    table,
    vacuum,
    write_json,
)
from outbox._migrate import VERSION_TABLE, alembic_config, upgrade

USERS = 1000
VARIANTS = ("business", "plain_insert", "enqueue", "naive", "plain_consumed")
CONSUMER = """
import sys, time
import psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    while True:
        deleted = conn.execute(
            "DELETE FROM bench_message WHERE id IN (SELECT id FROM bench_message"
            " WHERE status = 'pending' ORDER BY priority, next_attempt_at, id"
            " LIMIT 100 FOR UPDATE SKIP LOCKED)"
        ).rowcount
        if deleted < 100:
            time.sleep(0.005)
"""
"""``plain_consumed``'s consumer: the least a delivery does with the rows."""
GOAL = 0.95  # enqueue / plain insert at 32 connections with a dispatcher (issue 18)
BUSINESS = """\\set uid random(1, {users})
\\set px random(100000, 200000)
BEGIN;
INSERT INTO bench_order (account, instrument, side, volume, price)
     VALUES ('u' || :uid, 'EURUSD', 'buy', 1.0, :px / 100000.0);
{extra}COMMIT;
"""
ENQUEUE = """SELECT outbox.enqueue('push', 'price_alert', 'u' || :uid,
       jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',
                          'trigger_price', (:px / 100000.0)::text,
                          'current_price', ((:px + 20) / 100000.0)::text));
"""
NOTIFY = "SELECT pg_notify('bench_naive_wakeup', 'u' || :uid);\n"
# the two databases of the revisions section (their revisions: --previous, --head)
PREVIOUS, HEAD = "previous", "head"
# the second wave's options, as named arguments of outbox.enqueue
OPTIONS = {
    "enqueue": "",
    "enqueue + expires_at": ", expires_at => now() + interval '1 hour'",
    "enqueue + collapse_key": ", collapse_key => 'price-EURUSD'",  # no ':' (pgbench)
    "enqueue + escalate_after": ", escalate_after => interval '5 minutes'",
}
# One round, as (variant, revision): enqueue without options runs twice on each
# database, in the order previous, head, head, previous (reversed every other round),
# so that a drift within the round weighs on both alike and the repeats say how far
# two measurements of the same thing differ (the noise); the options run in between.
SECOND = "enqueue, again"
ROUND = (
    ("business", PREVIOUS),
    ("business", HEAD),
    ("enqueue", PREVIOUS),
    ("enqueue", HEAD),
    ("enqueue + expires_at", HEAD),
    ("enqueue + collapse_key", HEAD),
    ("enqueue + escalate_after", HEAD),
    (SECOND, HEAD),
    (SECOND, PREVIOUS),
)
ENQUEUE_WITH = """SELECT outbox.enqueue('push', 'price_alert', 'u' || :uid,
       jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',
                          'trigger_price', (:px / 100000.0)::text,
                          'current_price', ((:px + 20) / 100000.0)::text){options});
"""
LOOP_ENQUEUE = """DO $$
BEGIN
    FOR g IN 1..{calls} LOOP
        PERFORM outbox.enqueue('push', 'price_alert', 'u' || (1 + g % {users}),
            jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',
                               'trigger_price', (1 + g / 1e6)::text,
                               'current_price', (1 + g / 1e6 + 0.0002)::text){options});
    END LOOP;
END $$"""
LOOP_BUSINESS = """DO $$
BEGIN
    FOR g IN 1..{calls} LOOP
        INSERT INTO bench_order (account, instrument, side, volume, price)
             VALUES ('u' || (1 + g % {users}), 'EURUSD', 'buy', 1.0, 1 + g / 1e6);
    END LOOP;
END $$"""
# the row enqueue writes (its defaults: vars' shape, status, now(), enqueued_by), as a
# plain insert into a table of outbox.message's shape
PLAIN_INSERT = """INSERT INTO bench_message (lane, priority, channel, user_id, template, vars,
                           next_attempt_at)
     VALUES ('transactional', 0, 'push', 'u' || :uid, 'price_alert',
             jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',
                                'trigger_price', (:px / 100000.0)::text,
                                'current_price', ((:px + 20) / 100000.0)::text),
             now());
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench producer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--clients", default="8,32", help="connection counts (%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each run (%(default)s)"
    )
    parser.add_argument(
        "--dispatchers",
        default="0,1",
        help="outbox dispatch processes running meanwhile, one setting after the other "
        "(%(default)s)",
    )
    parser.add_argument(
        "--variants",
        default="business,plain_insert,enqueue",
        help=f"the dispatch section's transactions, of {','.join(VARIANTS)} (%(default)s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the dispatchers (e.g. OUTBOX_LISTEN=off)",
    )
    parser.add_argument(
        "--sections",
        default="dispatch,revisions,linger",
        help="what to run: dispatch (business, plain insert and enqueue, with and without "
        "a dispatcher), "
        "revisions (--previous against --head), linger (producer latency at a fixed rate, "
        "the dispatcher lingering or not) (%(default)s)",
    )
    parser.add_argument(
        "--linger-rate",
        type=int,
        default=2000,
        help="enqueue transactions per second in the linger section (%(default)s)",
    )
    parser.add_argument(
        "--linger-clients",
        type=int,
        default=8,
        help="pgbench connections in the linger section (%(default)s)",
    )
    parser.add_argument(
        "--previous",
        default="outbox_0007",
        help="the revisions section's previous schema revision (%(default)s: before the "
        "second wave)",
    )
    parser.add_argument(
        "--head",
        default="heads",
        help="the revisions section's new schema revision (%(default)s: the newest)",
    )
    parser.add_argument(
        "--revision-clients",
        default="8",
        help="pgbench connections in the revisions section (%(default)s)",
    )
    parser.add_argument(
        "--revision-seconds",
        type=float,
        default=5.0,
        help="duration of each pgbench run in the revisions section (%(default)s)",
    )
    parser.add_argument(
        "--revision-rounds",
        type=int,
        default=5,
        help="interleaved rounds in the revisions section (%(default)s)",
    )
    parser.add_argument(
        "--loop-calls",
        type=int,
        default=2000,
        help="calls per server-side loop in the revisions section (%(default)s)",
    )
    parser.add_argument(
        "--loop-repeats",
        type=int,
        default=7,
        help="loops per variant and round; the round's figure is the fastest (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.rounds = "8", 1.0, 1
        args.revision_clients, args.revision_seconds, args.revision_rounds = "8", 1.0, 1
        args.loop_calls, args.loop_repeats = 200, 1
        args.linger_rate = 200
    if args.head == "heads":
        args.head = newest_revision(args.database_url)
    args.names = {PREVIOUS: args.previous, HEAD: args.head}
    args.dispatcher_counts = [int(n) for n in args.dispatchers.split(",") if n.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variant_list) - set(VARIANTS) or "business" not in args.variant_list:
        parser.error(f"--variants: business and any of {', '.join(VARIANTS)}")
    args.sections = {part.strip() for part in args.sections.split(",") if part.strip()}
    unknown = args.sections - {"dispatch", "revisions", "linger"}
    if unknown or not args.sections:
        parser.error(f"--sections: choose from dispatch, revisions, linger (got {sorted(unknown)})")
    if args.linger_rate < 1 or args.linger_clients < 1:
        parser.error("--linger-rate and --linger-clients: at least 1")
    return args


def scripts(folder: Path) -> dict[str, Path]:
    texts = {
        "business": BUSINESS.format(users=USERS, extra=""),
        "plain_insert": BUSINESS.format(users=USERS, extra=PLAIN_INSERT),
        "enqueue": BUSINESS.format(users=USERS, extra=ENQUEUE),
        "naive": BUSINESS.format(users=USERS, extra=ENQUEUE + NOTIFY),
        "plain_consumed": BUSINESS.format(users=USERS, extra=PLAIN_INSERT),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.sql"
        paths[name].write_text(text)
    return paths


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)


def pgbench_command(url: str, script: Path, clients: int, seconds: float, *extra: str) -> list[str]:
    """pgbench running ``script`` over ``clients`` prepared connections for ``seconds``."""
    return [
        "pgbench",
        "-n",
        "-M",
        "prepared",
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        *extra,
        "-T",
        str(max(1, round(seconds))),
        url,
    ]


def pgbench(url: str, script: Path, clients: int, seconds: float) -> float:
    """Committed transactions per second."""
    command = pgbench_command(url, script, clients, seconds)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip() or done.stdout.strip()}")
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if failed and int(failed.group(1)):
        raise RuntimeError(f"pgbench: {failed.group(1)} transactions failed")
    return float(found.group(1))


def prepare(url: str) -> None:
    seed_recipients(url, USERS)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_order (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " account text NOT NULL, instrument text NOT NULL, side text NOT NULL,"
            " volume numeric NOT NULL, price numeric NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        # The reference for enqueue: outbox.message's columns and defaults, an identity
        # key and the claim index, without the function, its checks and the other
        # indexes and constraints (what the outbox adds to a plain outbox table).
        conn.execute("CREATE TABLE bench_message (LIKE outbox.message INCLUDING DEFAULTS)")
        conn.execute(
            "ALTER TABLE bench_message ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY,"
            " ADD PRIMARY KEY (id)"
        )
        claim = scalar(
            url,
            "SELECT pg_get_indexdef('outbox.message_claim_idx'::regclass)",
        )
        conn.execute(
            str(claim)
            .replace("INDEX message_claim_idx", "INDEX bench_message_claim_idx")
            .replace("ON outbox.message", "ON public.bench_message")
        )


def wait_drained(url: str, timeout: float = 120.0) -> None:
    """Let the dispatchers catch up, so that each run starts from an empty queue."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM outbox.message").fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.2)
    raise RuntimeError("the dispatchers did not drain the queue between runs")


Run = tuple[str, int, int]  # (variant, clients, dispatchers)


def start_dispatchers(url: str, count: int, env_items: list[str]) -> list[subprocess.Popen[bytes]]:
    env = dispatcher_env(url, **dict(item.split("=", 1) for item in env_items))
    processes = [
        subprocess.Popen(
            [OUTBOX, "dispatch"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    if processes:
        time.sleep(1.0)  # let them start and fall asleep
    return processes


_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_LATENCY_SD = re.compile(r"^latency stddev = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)

LINGERS = ("0", "default")
"""The linger section's dispatcher settings: ``OUTBOX_LINGER_SECONDS=0``, and unset."""


@dataclass
class RateRun:
    latency_ms: float
    stddev_ms: float
    notifies_per_commit: float


def paced_enqueue(url: str, script: Path, args: argparse.Namespace) -> RateRun:
    """``--linger-rate`` enqueue transactions per second for ``--seconds`` (pgbench
    ``-R``): their latency, and the NOTIFYs their commits sent per transaction."""
    command = pgbench_command(
        url, script, args.linger_clients, args.seconds, "-R", str(args.linger_rate)
    )
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_wakeup")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        notifies = sum(1 for _ in listener.notifies(timeout=0.5))
    latency, stddev, processed = (
        pattern.search(done.stdout) for pattern in (_LATENCY, _LATENCY_SD, _PROCESSED)
    )
    if done.returncode != 0 or not latency or not processed:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip() or done.stdout.strip()}")
    commits = max(1, int(processed.group(1)))
    return RateRun(
        latency_ms=float(latency.group(1)),
        stddev_ms=float(stddev.group(1)) if stddev else float("nan"),
        notifies_per_commit=notifies / commits,
    )


def linger_section(args: argparse.Namespace) -> dict[str, list[float]]:
    """Producers' latency at a fixed rate, the dispatcher lingering (default) or not."""
    if shutil.which("pgbench") is None:
        raise SystemExit("bench producer needs pgbench (PostgreSQL's client tools) on PATH")
    runs: dict[str, list[RateRun]] = {linger: [] for linger in LINGERS}
    with fresh_database(args.database_url, "producer") as url, tempfile.TemporaryDirectory() as tmp:
        prepare(url)
        script = scripts(Path(tmp))["enqueue"]
        for round_ in range(1, args.rounds + 1):
            order = LINGERS if round_ % 2 else LINGERS[::-1]
            for linger in order:
                env = [] if linger == "default" else [f"OUTBOX_LINGER_SECONDS={linger}"]
                dispatchers = start_dispatchers(url, 1, [*args.env, *env])
                try:
                    wait_drained(url)
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("TRUNCATE bench_order")
                    vacuum(url, "bench_order", "outbox.message", "outbox.attempt")
                    # asleep, as producers find it when the rate starts
                    time.sleep(0.5)
                    result = paced_enqueue(url, script, args)
                    wait_drained(url)
                finally:
                    stop_dispatchers(dispatchers)
                runs[linger].append(result)
                print(
                    f"  round {round_}: linger {linger:7s} {result.latency_ms:6.2f} ms"
                    f" (sd {result.stddev_ms:.2f}), {result.notifies_per_commit:.3f}"
                    " NOTIFY per commit",
                    flush=True,
                )
    rows = []
    for linger in LINGERS:
        latency = summarize([r.latency_ms for r in runs[linger]])
        stddev = summarize([r.stddev_ms for r in runs[linger]])
        notifies = summarize([r.notifies_per_commit for r in runs[linger]])
        ratios = [
            r.latency_ms / base.latency_ms
            for r, base in zip(runs[linger], runs[LINGERS[0]], strict=True)
        ]
        rows.append(
            [
                "0" if linger == "0" else "default (0.005)",
                latency.cell("{:.2f}"),
                stddev.cell("{:.2f}"),
                f"{notifies.median:.3f}",
                "" if linger == LINGERS[0] else f"{statistics.median(ratios):.3f}",
                "" if linger == LINGERS[0] else " ".join(f"{r:.3f}" for r in ratios),
            ]
        )
    print(
        table(
            [
                "OUTBOX_LINGER_SECONDS",
                "latency ms median (min..max)",
                "stddev ms",
                "NOTIFY per commit",
                "latency / linger 0",
                "per round",
            ],
            rows,
            f"Producer latency at {args.linger_rate:,}/s over {args.linger_clients}"
            " connections, one dispatcher (enqueue transactions, pgbench -R)",
        )
    )
    return {f"linger={linger}": [r.latency_ms for r in results] for linger, results in runs.items()}


def stop_dispatchers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> dict[Run, list[float]]:
    """tps per round by (variant, clients, dispatchers)."""
    if shutil.which("pgbench") is None:
        raise SystemExit("bench producer needs pgbench (PostgreSQL's client tools) on PATH")
    client_counts = [int(c) for c in args.clients.split(",") if c]
    rates: dict[Run, list[float]] = {}
    with fresh_database(args.database_url, "producer") as url, tempfile.TemporaryDirectory() as tmp:
        prepare(url)
        paths = scripts(Path(tmp))
        for count in args.dispatcher_counts:
            dispatchers = start_dispatchers(url, count, args.env)
            try:
                for round_ in range(1, args.rounds + 1):
                    for clients in client_counts:
                        for variant in args.variant_list:
                            if dispatchers:
                                wait_drained(url)
                                tables = ["bench_message"]
                            else:
                                tables = ["bench_message", "outbox.message"]
                            with psycopg.connect(url, autocommit=True) as conn:
                                conn.execute(f"TRUNCATE {', '.join(tables)}")
                            vacuum(
                                url,
                                "bench_order",
                                "bench_message",
                                "outbox.message",
                                "outbox.attempt",
                                "outbox.sleeper",
                            )
                            consumer = (
                                subprocess.Popen([sys.executable, "-c", CONSUMER, url])
                                if variant == "plain_consumed"
                                else None
                            )
                            try:
                                tps = pgbench(url, paths[variant], clients, args.seconds)
                            finally:
                                if consumer is not None:
                                    consumer.terminate()
                                    consumer.wait(30)
                            rates.setdefault((variant, clients, count), []).append(tps)
                            print(
                                f"  round {round_}: {count} dispatcher(s) {variant:12s}"
                                f" x{clients:<3d} {tps:8,.0f} tps",
                                flush=True,
                            )
            finally:
                stop_dispatchers(dispatchers)
    return rates


# ----------------------------------------------------------------------- revisions

Key = tuple[str, str]  # (variant, revision)


def newest_revision(url: str) -> str:
    """The newest of outbox's schema revisions (what ``upgrade(url)`` migrates to)."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config(url)).get_current_head())


def revision_scripts(folder: Path) -> dict[str, Path]:
    """pgbench scripts of the revisions section, by variant."""
    texts = {"business": BUSINESS.format(users=USERS, extra="")}
    for variant, options in OPTIONS.items():
        texts[variant] = BUSINESS.format(users=USERS, extra=ENQUEUE_WITH.format(options=options))
    paths = {}
    for number, (variant, text) in enumerate(texts.items()):
        paths[variant] = folder / f"revision-{number}.sql"
        paths[variant].write_text(text)
    return paths


def loop_sql(variant: str, calls: int) -> str:
    """The server-side loop of ``calls`` calls of ``variant``."""
    if variant == "business":
        return LOOP_BUSINESS.format(calls=calls, users=USERS)
    return LOOP_ENQUEUE.format(calls=calls, users=USERS, options=OPTIONS[variant])


def empty(url: str) -> None:
    """An empty queue, log and order table, vacuumed, for the next run."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox.message, outbox.attempt, bench_order")
    vacuum(url, "bench_order", "outbox.message", "outbox.attempt")


def loop_micros(url: str, variant: str, calls: int, repeats: int) -> float:
    """Microseconds per call of the fastest of ``repeats`` loops, each rolled back (the
    least disturbed by whatever else the machine runs)."""
    sql = loop_sql(variant, calls)
    timings = []
    with psycopg.connect(url) as conn:
        # the session compiles the functions and caches their plans on first use
        conn.execute(loop_sql(variant, 50))
        conn.rollback()
        for _ in range(repeats):
            started = time.perf_counter()
            conn.execute(sql)
            elapsed = time.perf_counter() - started
            conn.rollback()
            timings.append(elapsed / calls * 1e6)
        conn.autocommit = True
        # the rolled-back rows leave dead tuples and index entries behind
        conn.execute("VACUUM outbox.message, outbox.attempt, bench_order")
    return min(timings)


def round_order(round_: int) -> list[Key]:
    """The runs of one round: ``ROUND``, with previous and head swapped in even ones."""
    if round_ % 2:
        return list(ROUND)
    swap = {PREVIOUS: HEAD, HEAD: PREVIOUS}
    return [
        (variant, swap[revision] if variant in ("business", "enqueue", SECOND) else revision)
        for variant, revision in ROUND
    ]


def run_revisions(
    args: argparse.Namespace,
) -> tuple[dict[int, dict[Key, list[float]]], dict[Key, list[float]]]:
    """pgbench tps by clients and (variant, revision); loop µs by (variant, revision)."""
    if shutil.which("pgbench") is None:
        raise SystemExit("bench producer needs pgbench (PostgreSQL's client tools) on PATH")
    client_counts = [int(c) for c in args.revision_clients.split(",") if c]
    rates: dict[int, dict[Key, list[float]]] = {clients: {} for clients in client_counts}
    micros: dict[Key, list[float]] = {}
    with (
        fresh_database(args.database_url, "producer_prev", migrate=False) as previous,
        fresh_database(args.database_url, "producer_head", migrate=False) as head,
        tempfile.TemporaryDirectory() as tmp,
    ):
        urls = {PREVIOUS: previous, HEAD: head}
        for revision, url in urls.items():
            upgrade(url, args.names[revision])
            found = scalar(url, f"SELECT version_num FROM {VERSION_TABLE}")
            if found != args.names[revision]:
                raise RuntimeError(f"the {revision} database is at {found}")
            prepare(url)
        paths = revision_scripts(Path(tmp))
        for round_ in range(1, args.revision_rounds + 1):
            for variant, revision in round_order(round_):
                url = urls[revision]
                empty(url)
                value = loop_micros(url, _script(variant), args.loop_calls, args.loop_repeats)
                micros.setdefault((variant, revision), []).append(value)
                print(
                    f"  round {round_}: {variant:24s} {revision} loop {value:7.1f} us/call",
                    flush=True,
                )
            for clients in client_counts:
                for variant, revision in round_order(round_):
                    url = urls[revision]
                    empty(url)
                    tps = pgbench(url, paths[_script(variant)], clients, args.revision_seconds)
                    rates[clients].setdefault((variant, revision), []).append(tps)
                    print(
                        f"  round {round_}: {variant:24s} {revision} x{clients:<3d}"
                        f" {tps:8,.0f} tps",
                        flush=True,
                    )
    return rates, micros


def _script(variant: str) -> str:
    return "enqueue" if variant == SECOND else variant


@dataclass(frozen=True)
class Verdict:
    """A ratio per round, against how far two runs of the same thing drift apart."""

    ratios: tuple[float, ...]
    repeats: tuple[float, ...]
    """Second run / first run of enqueue on the same database, every round, both."""

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def noise(self) -> float:
        """How far a ratio strays from 1 by chance here: the repeats' largest
        deviation from 1, or half the spread of the ratio's own rounds if larger."""
        drift = max(abs(r - 1) for r in self.repeats)
        own = (max(self.ratios) - min(self.ratios)) / 2
        return max(drift, own)

    @property
    def within_noise(self) -> bool:
        return abs(self.median - 1) <= self.noise

    def line(self, what: str, label: str, higher_is_better: bool) -> str:
        change = self.median - 1
        cost = -change if higher_is_better else change
        return (
            f"{what}: {label} {self.median:.3f} (per round "
            f"{min(self.ratios):.3f}..{max(self.ratios):.3f}), noise ±{self.noise:.1%}: "
            + (
                f"within noise ({abs(change):.1%} ≤ {self.noise:.1%})"
                if self.within_noise
                else f"OUTSIDE noise: it {'costs' if cost > 0 else 'saves'} "
                f"{abs(change):.1%} ({abs(change):.1%} > {self.noise:.1%})"
            )
        )


def combined(values: dict[Key, list[float]]) -> dict[Key, list[float]]:
    """The figures per round, with enqueue's two runs per database averaged."""
    out = {key: list(v) for key, v in values.items() if key[0] != SECOND}
    for revision in (PREVIOUS, HEAD):
        out[("enqueue", revision)] = [
            (a + b) / 2
            for a, b in zip(values[("enqueue", revision)], values[(SECOND, revision)], strict=True)
        ]
    return out


def repeats(values: dict[Key, list[float]]) -> tuple[float, ...]:
    """Second run / first run of enqueue, both databases, every round."""
    return tuple(
        b / a
        for revision in (PREVIOUS, HEAD)
        for a, b in zip(values[("enqueue", revision)], values[(SECOND, revision)], strict=True)
    )


def _baseline(variant: str, revision: str) -> Key | None:
    """What a row is compared with: the same at the previous revision, or plain
    enqueue at head for an option."""
    if revision == PREVIOUS:
        return None
    if variant in ("business", "enqueue"):
        return variant, PREVIOUS
    return "enqueue", HEAD


def _label(variant: str) -> str:
    return "head / previous" if variant == "enqueue" else "with / without the option"


def per_round(values: dict[Key, list[float]], top: Key, bottom: Key) -> tuple[float, ...]:
    return tuple(t / b for t, b in zip(values[top], values[bottom], strict=True))


ROWS = tuple(key for key in ROUND if key[0] != SECOND)


def revision_rows(
    values: dict[Key, list[float]], fmt: str, extra: list[object], names: dict[str, str]
) -> list[list[object]]:
    """One table row per (variant, revision): figure, spread, ratio to its baseline."""
    rows: list[list[object]] = []
    for variant, revision in ROWS:
        value = summarize(values[(variant, revision)])
        base = _baseline(variant, revision)
        if base is None:
            ratio, rounds, against = "1.00", "", ""
        else:
            ratios = per_round(values, (variant, revision), base)
            ratio = f"{statistics.median(ratios):.3f}"
            rounds = f"{min(ratios):.3f}..{max(ratios):.3f}"
            against = f"{base[0]} at {names[base[1]]}"
        rows.append(
            [
                variant,
                names[revision],
                *extra,
                value.cell(fmt),
                f"{value.spread:.0%}",
                ratio,
                against,
                rounds,
            ]
        )
    return rows


def verdicts_of(
    values: dict[Key, list[float]],
    noise: tuple[float, ...],
    what: str,
    higher_is_better: bool,
    names: dict[str, str],
) -> dict[str, tuple[Verdict, str]]:
    out = {}
    for variant in OPTIONS:
        bottom: Key = ("enqueue", PREVIOUS if variant == "enqueue" else HEAD)
        name = f"{what}: {variant}" + (
            f" (no new options) at {names[HEAD]} vs {names[PREVIOUS]}"
            if variant == "enqueue"
            else " vs plain"
        )
        verdict = Verdict(per_round(values, (variant, HEAD), bottom), noise)
        out[name] = (verdict, verdict.line(name, _label(variant), higher_is_better))
    return out


def revision_tables(
    rates: dict[int, dict[Key, list[float]]],
    micros: dict[Key, list[float]],
    names: dict[str, str],
) -> tuple[str, list[str], dict[str, Verdict]]:
    """The two tables of the revisions section, the verdict lines, and the verdicts."""
    found: dict[str, tuple[Verdict, str]] = {}
    rows: list[list[object]] = []
    aa: list[str] = []
    for clients, values in sorted(rates.items()):
        rows += revision_rows(combined(values), "{:,.0f}", [clients], names)
        noise = repeats(values)
        aa.append(f"tps x{clients} {min(noise):.3f}..{max(noise):.3f}")
        found |= verdicts_of(combined(values), noise, f"tps x{clients}", True, names)
    text = table(
        [
            "transaction",
            "revision",
            "connections",
            "tps median (min..max)",
            "spread",
            "ratio",
            "against",
            "per-round ratio",
        ],
        rows,
        f"Enqueue by schema revision: pgbench, no dispatcher ({names[PREVIOUS]} = previous, "
        f"{names[HEAD]} = head; enqueue: the mean of its two runs per round)",
    )
    noise = repeats(micros)
    aa.append(f"us per call {min(noise):.3f}..{max(noise):.3f}")
    found |= verdicts_of(combined(micros), noise, "us per call", False, names)
    text += "\n" + table(
        [
            "call",
            "revision",
            "us per call median (min..max)",
            "spread",
            "ratio",
            "against",
            "per-round ratio",
        ],
        revision_rows(combined(micros), "{:,.1f}", [], names),
        "Enqueue by schema revision: server-side loop, microseconds per call "
        "(business = one bench_order insert)",
    )
    lines = [
        "noise: enqueue run twice per round on each database, second / first: " + "; ".join(aa)
    ]
    lines += [line for _, line in found.values()]
    return text, lines, {name: verdict for name, (verdict, _) in found.items()}


def ratios_of(rates: dict[Run, list[float]], top: Run, bottom: Run) -> list[float]:
    """``top`` / ``bottom``, round by round (the runs of one round are interleaved)."""
    return [t / b for t, b in zip(rates[top], rates[bottom], strict=True)]


def goal_line(rates: dict[Run, list[float]]) -> tuple[str, Target | None]:
    """The issue's goal, from the median of the per-round ratios."""
    dispatched = sorted({d for _, _, d in rates if d > 0})
    clients = 32
    variants = {v for v, _, _ in rates}
    if (
        not dispatched
        or not {"enqueue", "plain_insert"} <= variants
        or clients not in {c for _, c, _ in rates}
    ):
        return (
            "goal: not measured (needs enqueue and plain_insert at 32 clients with a dispatcher)",
            None,
        )
    count = dispatched[0]
    ratios = ratios_of(rates, ("enqueue", clients, count), ("plain_insert", clients, count))
    median = statistics.median(ratios)
    met = median >= GOAL
    line = (
        f"enqueue / plain insert at {clients} clients with a dispatcher "
        f">= {GOAL}: {'met' if met else 'missed'} (median of per-round ratios "
        f"{median:.3f}; rounds {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    target = Target(
        f"enqueue / plain insert at {clients} connections, {count} dispatcher(s)", median, GOAL
    )
    return line, target


def dispatch_section(args: argparse.Namespace) -> tuple[list[Target], dict[str, list[float]]]:
    """Business, plain insert and enqueue, with and without a dispatcher."""
    rates = run(args)
    bases = [b for b in ("business", "plain_insert", "plain_consumed") if b in args.variant_list]
    rows = []
    for count in args.dispatcher_counts:
        for clients in sorted({c for _, c, _ in rates}):
            for variant in args.variant_list:
                key = (variant, clients, count)
                rate = summarize(rates[key])
                cells: list[object] = [variant, clients, count, rate.cell(), f"{rate.spread:.0%}"]
                for base in bases:
                    if (
                        variant == base
                        or variant == "business"
                        or (base != "business" and variant not in ("enqueue", "naive"))
                        or (base, clients, count) not in rates
                    ):
                        cells += ["", ""]
                        continue
                    ratios = ratios_of(rates, key, (base, clients, count))
                    cells += [
                        f"{statistics.median(ratios):.3f}",
                        " ".join(f"{r:.3f}" for r in ratios),
                    ]
                rows.append(cells)
    print(
        table(
            [
                "transaction",
                "connections",
                "dispatchers",
                "tps median (min..max)",
                "spread",
                *(
                    column
                    for base in bases
                    for column in (f"/ {base.replace('_', ' ')}", "per round")
                ),
            ],
            rows,
            "Producer transactions (ratios: median of the per-round ratios)",
        )
    )
    line, target = goal_line(rates)
    print(f"\n{line}")
    return ([target] if target else []), {f"{v}x{c}d{d}": r for (v, c, d), r in rates.items()}


def revisions_section(args: argparse.Namespace) -> dict[str, object]:
    """The previous revision against head: tables, verdicts, figures."""
    rates, micros = run_revisions(args)
    text, lines, verdicts = revision_tables(rates, micros, args.names)
    print(text)
    print("\nRatios against the noise:")
    for line in lines:
        print(f"- {line}")
    return {
        "tps": {
            f"{v} @ {r} x{c}": values
            for c, by_key in rates.items()
            for (v, r), values in by_key.items()
        },
        "us_per_call": {f"{v} @ {r}": values for (v, r), values in micros.items()},
        "verdicts": {
            name: {
                "median": v.median,
                "per_round": v.ratios,
                "repeats": v.repeats,
                "noise": v.noise,
                "within_noise": v.within_noise,
            }
            for name, v in verdicts.items()
        },
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = []
    if "dispatch" in args.sections:
        plan.append(
            f"dispatch: {', '.join(args.variant_list)}; {args.seconds:g} s per run, "
            f"clients {args.clients}, dispatchers {args.dispatchers}, rounds {args.rounds}"
        )
    if "revisions" in args.sections:
        plan.append(
            f"revisions: {args.previous} against {args.head}, no dispatcher, "
            f"{args.revision_seconds:g} s per pgbench run, clients {args.revision_clients}, "
            f"rounds {args.revision_rounds}; "
            f"loops of {args.loop_calls} calls, fastest of {args.loop_repeats} per round"
        )
    if "linger" in args.sections:
        plan.append(
            f"linger: enqueue at {args.linger_rate}/s over {args.linger_clients} connections,"
            f" one dispatcher lingering 0 s and the default, {args.seconds:g} s per run,"
            f" rounds {args.rounds}"
        )
    facts = print_header("producer", args, "\n".join(plan))
    targets: list[Target] = []
    payload: dict[str, object] = {
        "machine": facts,
        "args": {**vars(args), "sections": sorted(args.sections)},
    }
    if "dispatch" in args.sections:
        targets, payload["tps"] = dispatch_section(args)
    if "revisions" in args.sections:
        payload["revisions"] = revisions_section(args)
    if "linger" in args.sections:
        payload["linger"] = linger_section(args)
    write_json(args.json, payload)
    return report(targets, check=args.check, quick=args.quick)
