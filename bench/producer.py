"""``python -m bench producer``: what the outbox costs the trading code's transactions.

Three transactions, each run by 1, 8 and 32 concurrent connections for ``--seconds``
(pgbench, so the client is not the bottleneck), with dispatchers running:

- ``business``: one business-row insert (an order) and commit;
- ``two_rows``: the same insert plus a second plain order insert, for reference: what
  any second statement in the transaction costs on this machine;
- ``enqueue``: the same insert plus ``outbox.enqueue(...)``;
- ``naive``: the same as ``enqueue`` plus a ``pg_notify`` in every transaction, the
  wakeup the design rejects (NOTIFY takes a global lock at commit).

Variants are interleaved within each round so that noise from the shared machine
lands on all of them alike.

Target: ``enqueue`` reaches at least 0.85 of the ``business`` rate at 32 connections.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
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
    seed_recipients,
    summarize,
    table,
    vacuum,
    write_json,
)

USERS = 1000
VARIANTS = ("business", "two_rows", "enqueue", "naive")
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
SECOND_ROW = """INSERT INTO bench_order (account, instrument, side, volume, price)
     VALUES ('u' || :uid, 'EURUSD', 'sell', 1.0, :px / 100000.0);
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench producer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--clients", default="1,8,32", help="connection counts (%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each run (%(default)s)"
    )
    parser.add_argument(
        "--dispatchers",
        type=int,
        default=1,
        help="outbox dispatch processes running meanwhile (%(default)s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the dispatchers (e.g. OUTBOX_LISTEN=off)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.rounds = "1,8", 1.0, 1
    return args


def scripts(folder: Path) -> dict[str, Path]:
    texts = {
        "business": BUSINESS.format(users=USERS, extra=""),
        "two_rows": BUSINESS.format(users=USERS, extra=SECOND_ROW),
        "enqueue": BUSINESS.format(users=USERS, extra=ENQUEUE),
        "naive": BUSINESS.format(users=USERS, extra=ENQUEUE + NOTIFY),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.sql"
        paths[name].write_text(text)
    return paths


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)


def pgbench(url: str, script: Path, clients: int, seconds: float) -> float:
    """Committed transactions per second."""
    command = [
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
        "-T",
        str(max(1, round(seconds))),
        url,
    ]
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


def run(args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    if shutil.which("pgbench") is None:
        raise SystemExit("bench producer needs pgbench (PostgreSQL's client tools) on PATH")
    client_counts = [int(c) for c in args.clients.split(",") if c]
    rates: dict[tuple[str, int], list[float]] = {}
    with fresh_database(args.database_url, "producer") as url, tempfile.TemporaryDirectory() as tmp:
        prepare(url)
        paths = scripts(Path(tmp))
        env = dispatcher_env(url, **dict(item.split("=", 1) for item in args.env))
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
            time.sleep(1.0)  # let them start and fall asleep
            for round_ in range(1, args.rounds + 1):
                for clients in client_counts:
                    for variant in VARIANTS:
                        if dispatchers:
                            wait_drained(url)
                        else:
                            with psycopg.connect(url, autocommit=True) as conn:
                                conn.execute("TRUNCATE outbox.message")
                        vacuum(
                            url, "bench_order", "outbox.message", "outbox.attempt", "outbox.sleeper"
                        )
                        tps = pgbench(url, paths[variant], clients, args.seconds)
                        rates.setdefault((variant, clients), []).append(tps)
                        print(
                            f"  round {round_}: {variant:8s} x{clients:<3d} {tps:8,.0f} tps",
                            flush=True,
                        )
        finally:
            for process in dispatchers:
                process.terminate()
            for process in dispatchers:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return rates


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "producer",
        args,
        f"{args.seconds:g} s per run, clients "
        f"{args.clients}, {args.dispatchers} dispatcher(s) running, "
        f"rounds {args.rounds}",
    )
    rates = run(args)
    rows = []
    targets = []
    for clients in sorted({c for _, c in rates}):
        business = summarize(rates[("business", clients)])
        for variant in VARIANTS:
            rate = summarize(rates[(variant, clients)])
            ratios = [
                r / b
                for r, b in zip(
                    rates[(variant, clients)], rates[("business", clients)], strict=True
                )
            ]
            rows.append(
                [
                    variant,
                    clients,
                    rate.cell(),
                    f"{rate.spread:.0%}",
                    f"{rate.median / business.median:.2f}",
                    f"{min(ratios):.2f}..{max(ratios):.2f}",
                ]
            )
        if clients == 32 or clients == max(c for _, c in rates):
            enqueue = summarize(rates[("enqueue", clients)])
            targets.append(
                Target(
                    f"enqueue / business at {clients} connections",
                    enqueue.median / business.median,
                    0.85,
                )
            )
    print(
        table(
            [
                "transaction",
                "connections",
                "tps median (min..max)",
                "spread",
                "/ business",
                "per-round ratio",
            ],
            rows,
            "Producer transactions",
        )
    )
    write_json(
        args.json,
        {
            "machine": facts,
            "args": vars(args),
            "tps": {f"{v}x{c}": r for (v, c), r in rates.items()},
        },
    )
    return report(targets, check=args.check, quick=args.quick)
