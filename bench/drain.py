"""``python -m bench drain``: how fast a backlog drains, and at what CPU per message.

``--count`` messages (default 100,000) are pending before the workers start; the
clock runs from "go" (every worker process imported and connected) until the last
process has exited because nothing is left. outbox runs the real ``outbox dispatch
--until-idle`` command with the full pipeline (claim, recipients, render, send,
batched ack that deletes the row and writes the attempt log) on a channel that
accepts instantly (``bench._sink``); pgqueuer (at each of ``--pgqueuer-batch-sizes``)
and procrastinate drain the same count of no-op jobs with the same number of
processes. Each message has its own vars (a distinct price), so nothing is rendered
twice. Rounds interleave the systems, so that load from elsewhere lands on all alike.

Worker CPU per message is the CPU time (user + system) of the worker processes after
"go", over the count: other load on the machine inflates it much less than the rate.

Goal: outbox's worker CPU per message at or below pgqueuer's at batch 100 (the
no-op job at its fastest setting), for each process count.
Target: outbox at least 2x pgqueuer's rate (batch 100) with the same process count.
Also reported: peak RSS of each outbox dispatcher (target under 150 MB).
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench._common import (
    Summary,
    Target,
    Workers,
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
from bench._worker import procrastinate_app

SYSTEMS = ("outbox", "pgqueuer", "procrastinate")
USERS = 1000
GOAL_AGAINST = "pgqueuer b100"
"""The row whose worker CPU per message outbox's must not exceed (issue 18's goal)."""


@dataclass
class Figures:
    """Rates (messages/s), worker CPU (us/message) and peak RSS (MB) per (row, processes).

    A row is ``outbox``, ``procrastinate`` or ``pgqueuer b<batch size>``.
    """

    rates: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    rss: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    cpu_us: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """Worker processes' CPU time per message (all processes together), microseconds."""

    def rate(self, row: str, processes: int) -> Summary | None:
        values = self.rates.get((row, processes))
        return summarize(values) if values else None

    def cpu(self, row: str, processes: int) -> Summary | None:
        values = self.cpu_us.get((row, processes))
        return summarize(values) if values else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench drain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--count", type=int, default=100_000, help="messages (%(default)s)")
    parser.add_argument("--processes", default="1,2", help="process counts (%(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="(%(default)s)")
    parser.add_argument(
        "--channel",
        default="push",
        choices=("push", "email", "telegram"),
        help="channel (and so renderer) of the messages (%(default)s)",
    )
    parser.add_argument(
        "--template", default="price_alert", choices=("price_alert", "position_failure_sl")
    )
    parser.add_argument(
        "--shared-vars",
        action="store_true",
        help="every message has the same vars (a fan-out alert): the render cache hits",
    )
    parser.add_argument(
        "--dispatch-args",
        default="",
        help="extra flags for outbox dispatch, e.g. '--batch-size 200'",
    )
    parser.add_argument(
        "--outbox-processes",
        choices=("supervisor", "replicas"),
        default="supervisor",
        help="outbox's rows with more than one process: one 'outbox dispatch --processes N'"
        " (supervisor) or N separate 'outbox dispatch' replicas (%(default)s)",
    )
    parser.add_argument(
        "--pgqueuer-batch-sizes",
        default="10,100",
        help="pgqueuer dequeue batches, one row each (%(default)s; its default is 10)",
    )
    parser.add_argument(
        "--pgqueuer-driver",
        default="asyncpg",
        choices=("asyncpg", "psycopg"),
        help="pgqueuer's database driver (%(default)s)",
    )
    parser.add_argument(
        "--procrastinate-count",
        type=int,
        default=None,
        help="jobs for procrastinate (default: --count)",
    )
    parser.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=32,
        help="async jobs per procrastinate worker (%(default)s)",
    )
    parser.add_argument("--keep-logs", metavar="DIR", help="write worker logs here")
    args = parser.parse_args(argv)
    if args.quick:
        # both process counts: the two-process row runs the supervisor (outbox dispatch
        # --processes 2), a path of its own
        args.count, args.rounds, args.processes = min(args.count, 500), 1, "1,2"
    return args


def rows_of(args: argparse.Namespace) -> list[str]:
    """The rows one round runs, in order: pgqueuer once per batch size."""
    rows = []
    for system in (s for s in args.systems.split(",") if s):
        if system == "pgqueuer":
            rows += [f"pgqueuer b{int(b)}" for b in args.pgqueuer_batch_sizes.split(",") if b]
        else:
            rows.append(system)
    return rows


def system_of(row: str) -> str:
    return row.split(" ", 1)[0]


# ------------------------------------------------------------------------ setup


def install_competitors(url: str, systems: set[str]) -> None:
    async def install() -> None:
        if "pgqueuer" in systems:
            from pgqueuer import Queries

            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            try:
                await Queries.from_psycopg_connection(conn).install()
            finally:
                await conn.close()
        if "procrastinate" in systems:
            app = procrastinate_app(url)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

    asyncio.run(install())


def seed(system: str, url: str, count: int, args: argparse.Namespace) -> None:
    if system == "outbox":
        seed_messages(
            url,
            count,
            channel=args.channel,
            template=args.template,
            users=USERS,
            shared_vars=args.shared_vars,
        )
        vacuum(url, "outbox.message", "outbox.attempt")
        return

    async def enqueue() -> None:
        if system == "pgqueuer":
            from pgqueuer import Queries

            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            try:
                queries = Queries.from_psycopg_connection(conn)
                for first in range(0, count, 10_000):
                    n = min(10_000, count - first)
                    await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
            finally:
                await conn.close()
        else:
            app = procrastinate_app(url)
            async with app.open_async():
                task = app.tasks["noop"]
                for first in range(0, count, 10_000):
                    n = min(10_000, count - first)
                    await task.batch_defer_async(*({} for _ in range(n)))

    asyncio.run(enqueue())
    vacuum(url, "pgqueuer" if system == "pgqueuer" else "procrastinate_jobs")


def worker_argvs(row: str, processes: int, url: str, args: argparse.Namespace) -> list[list[str]]:
    """The command line of each worker process of one run (``python -m bench._worker``).

    outbox with one process is ``outbox dispatch --until-idle``; with more, one
    ``outbox dispatch --processes N --until-idle`` (a supervisor and N dispatcher
    processes, as an operator runs them), whose worker counts its children's CPU
    (``bench._worker``, ``outbox-supervised``).
    """
    system = system_of(row)
    if system == "outbox" and processes > 1 and args.outbox_processes == "supervisor":
        return [["outbox-supervised", str(processes), "--until-idle", *args.dispatch_args.split()]]
    if system == "outbox":
        return [["outbox", "--until-idle", *args.dispatch_args.split()]] * processes
    if system == "pgqueuer":
        batch = row.split(" b", 1)[1]
        return [["pgqueuer", url, batch, args.pgqueuer_driver]] * processes
    return [["procrastinate", url, str(args.procrastinate_concurrency)]] * processes


PAUSE_PUSH = """
INSERT INTO outbox.channel_state (channel, paused_until) VALUES ('push', now() + interval '1 hour')
ON CONFLICT (channel) DO UPDATE SET paused_until = excluded.paused_until
"""
"""Holds a supervisor's children at the start line: a paused channel's messages are
not claimed, and a dispatcher waits (for the pause's end, a NOTIFY or its poll)."""
START = "UPDATE outbox.channel_state SET paused_until = NULL, failures = 0; NOTIFY outbox_wakeup"
"""The start: the channel open again, every sleeping dispatcher woken."""


def left_over(system: str, url: str) -> int:
    """Work not done after the run (must be 0)."""
    if system == "outbox":
        return int(scalar(url, "SELECT count(*) FROM outbox.message"))
    if system == "pgqueuer":
        return int(scalar(url, "SELECT count(*) FROM pgqueuer"))
    return int(
        scalar(url, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
    )


def one_run(
    row: str, processes: int, url: str, count: int, args: argparse.Namespace
) -> tuple[float, list[float], float]:
    """Drain ``count`` with ``processes`` workers.

    Returns messages/s, the peak RSS (MB) of each process, and the worker processes'
    CPU time per message (microseconds, after "go"), which noise from other load on
    the machine inflates much less than the wall-clock rate.
    """
    system = system_of(row)
    seed(system, url, count, args)
    env = dispatcher_env(url)
    log_dir = Path(args.keep_logs) if args.keep_logs else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    argvs = worker_argvs(row, processes, url, args)
    gated = argvs[0][0] == "outbox-supervised"
    if gated:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PAUSE_PUSH)
    workers = Workers(argvs, env, log_dir)
    try:
        workers.ready(timeout=120.0)
        started = workers.go()
        if gated:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(START)
        finished = workers.wait(timeout=max(600.0, count / 50))
    except BaseException:
        workers.kill()
        raise
    rest = left_over(system, url)
    if rest:
        raise RuntimeError(f"{row}: {rest} jobs left after the workers exited")
    if system == "outbox":
        sent = int(scalar(url, "SELECT count(*) FROM outbox.attempt WHERE outcome = 'sent'"))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox.attempt")
        if sent != count:
            raise RuntimeError(f"outbox: {sent} sent attempts logged, expected {count}")
    cpu_us = sum(workers.cpu_seconds) / count * 1e6
    return count / (finished - started), workers.peak_rss_mb, cpu_us


def run(args: argparse.Namespace) -> Figures:
    rows = rows_of(args)
    process_counts = [int(p) for p in args.processes.split(",") if p]
    figures = Figures()
    with fresh_database(args.database_url, "drain") as url:
        seed_recipients(url, USERS)
        install_competitors(url, {system_of(row) for row in rows})
        for round_ in range(1, args.rounds + 1):
            for processes in process_counts:
                for row in rows:
                    count = args.count
                    if row == "procrastinate" and args.procrastinate_count:
                        count = min(count, args.procrastinate_count)
                    rate, rss, cpu_us = one_run(row, processes, url, count, args)
                    figures.cpu_us.setdefault((row, processes), []).append(cpu_us)
                    figures.rates.setdefault((row, processes), []).append(rate)
                    if row == "outbox":
                        figures.rss.setdefault((row, processes), []).append(max(rss))
                    print(
                        f"  round {round_}: {row} x{processes}: {rate:,.0f}/s,"
                        f" {cpu_us:.0f} us CPU/msg"
                        + (f", peak RSS {max(rss):.0f} MB" if row == "outbox" else ""),
                        flush=True,
                    )
    return figures


def paired(figures: Figures, kind: str, row: str, processes: int) -> str:
    """``min..max`` of outbox / ``row`` over the rounds (each round's pair side by side)."""
    values = getattr(figures, kind)
    pairs = [
        o / r for o, r in zip(values[("outbox", processes)], values[(row, processes)], strict=True)
    ]
    return f"{min(pairs):.2f}..{max(pairs):.2f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "drain",
        args,
        f"{args.count:,} messages, channel {args.channel}, "
        f"template {args.template}, rounds {args.rounds}",
    )
    figures = run(args)
    rows = rows_of(args)
    process_counts = [int(p) for p in args.processes.split(",") if p]
    lines = []
    targets = []
    for processes in process_counts:
        ours = figures.rate("outbox", processes)
        our_cpu = figures.cpu("outbox", processes)
        for row in rows:
            rate, cpu = figures.rate(row, processes), figures.cpu(row, processes)
            if rate is None or cpu is None:
                continue
            rate_ratio = rate_rounds = cpu_ratio = cpu_rounds = ""
            if ours and our_cpu and row != "outbox":
                rate_ratio = f"{ours.median / rate.median:.2f}x"
                rate_rounds = paired(figures, "rates", row, processes)
                cpu_ratio = f"{our_cpu.median / cpu.median:.2f}x"
                cpu_rounds = paired(figures, "cpu_us", row, processes)
            lines.append(
                [
                    row,
                    processes,
                    rate.cell(),
                    f"{rate.spread:.0%}",
                    rate_ratio,
                    rate_rounds,
                    cpu.cell(),
                    cpu_ratio,
                    cpu_rounds,
                ]
            )
        theirs = figures.cpu(GOAL_AGAINST, processes)
        if our_cpu and theirs:
            targets.append(
                Target(
                    f"outbox CPU/msg vs {GOAL_AGAINST}'s, {processes} process(es)",
                    our_cpu.median,
                    theirs.median,
                    at_least=False,
                    unit=" us",
                )
            )
        pgq = figures.rate(GOAL_AGAINST, processes)
        if ours and pgq:
            targets.append(
                Target(
                    f"outbox / {GOAL_AGAINST} rate, {processes} process(es)",
                    ours.median / pgq.median,
                    2.0,
                    unit="x",
                )
            )
    print(
        table(
            [
                "system",
                "processes",
                "messages/s median (min..max)",
                "spread",
                "outbox is",
                "per-round ratio",
                "worker CPU us/msg median (min..max)",
                "outbox CPU is",
                "per-round CPU ratio",
            ],
            lines,
            "Drain rate and worker CPU per message",
        )
    )
    rss_rows = [[p, summarize(v).cell("{:.0f}")] for (_, p), v in sorted(figures.rss.items())]
    if rss_rows:
        print(
            table(
                ["dispatchers", "peak RSS per dispatcher, MB (min..max)"],
                rss_rows,
                "Dispatcher memory",
            )
        )
        worst = max(max(v) for v in figures.rss.values())
        targets.append(
            Target("peak dispatcher RSS (worst round)", worst, 150, at_least=False, unit=" MB")
        )
    write_json(
        args.json,
        {
            "machine": facts,
            "args": vars(args),
            "rates": {f"{s}x{p}": v for (s, p), v in figures.rates.items()},
            "cpu_us_per_message": {f"{s}x{p}": v for (s, p), v in figures.cpu_us.items()},
            "rss_mb": {f"{s}x{p}": v for (s, p), v in figures.rss.items()},
        },
    )
    return report(targets, check=args.check, quick=args.quick)
