"""``outbox dispatch``: run one dispatcher replica in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from outbox._settings import Settings, parse_duration

log = logging.getLogger("outbox.dispatcher")


def register(commands: Any) -> None:
    """Add the ``dispatch`` subcommand to the ``outbox`` command line."""
    parser = commands.add_parser("dispatch", help="deliver messages (one replica)")
    parser.add_argument("--concurrency", type=int, default=32, help="sends in flight (32)")
    parser.add_argument("--batch-size", type=int, default=100, help="messages per claim (100)")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once idle: nothing in flight and nothing pending due within --idle-horizon",
    )
    parser.add_argument(
        "--idle-horizon",
        default="60s",
        metavar="DURATION",
        help="with --until-idle: wait for messages due within this long (60s)",
    )
    parser.set_defaults(handler=run_command, extra="dispatcher")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``outbox dispatch``."""
    if args.concurrency < 1 or args.batch_size < 1:
        print("outbox: --concurrency and --batch-size must be at least 1", file=sys.stderr)
        return 2
    args.idle_horizon_seconds = parse_duration(args.idle_horizon)
    return asyncio.run(_main(args, settings))


SCHEMA_RECHECK_SECONDS = 5.0


async def _wait_for_schema(settings: Settings, *, give_up: bool) -> bool:
    """Wait until the database is migrated; log the problem once, not every poll.

    Returns False when told to stop first, or at once with ``give_up`` (an
    ``--until-idle`` run is a batch job: it fails instead of waiting). An unreachable
    database is not this function's business: the dispatcher's pools ride it out.
    """
    import psycopg

    from outbox._schema_check import schema_problem_async

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiting = False
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(
                settings.database_url, autocommit=True, connect_timeout=10
            ) as conn:
                problem = await schema_problem_async(conn)
        except psycopg.Error:
            return True
        if problem is None:
            if waiting:
                log.info("the database is migrated now; starting")
            return True
        if give_up:
            log.error("%s", problem)
            return False
        if not waiting:
            log.error("%s; waiting for it (checking every %gs)", problem, SCHEMA_RECHECK_SECONDS)
            waiting = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SCHEMA_RECHECK_SECONDS)
    return False


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.dispatcher._dispatcher import Dispatcher, DispatcherOptions
    from outbox.dispatcher.channels import build_channels

    observer = None
    if args.metrics_port is not None:
        from outbox.dispatcher.metrics import DispatcherMetrics, serve_metrics

        observer = DispatcherMetrics()
        serve_metrics(args.metrics_port, settings)
    if not await _wait_for_schema(settings, give_up=args.until_idle):
        return 1 if args.until_idle else 0
    dispatcher = Dispatcher(
        settings,
        build_channels(settings),
        options=DispatcherOptions(
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            until_idle=args.until_idle,
            idle_horizon=args.idle_horizon_seconds,
        ),
        observer=observer,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, dispatcher.stop)
    await dispatcher.run()
    return 0
