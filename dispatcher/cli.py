"""``outbox dispatch``: run a dispatcher replica in the foreground (or N, supervised).

``--processes 1`` (the default) is one replica in this process. With more, this
process becomes the supervisor of that many child replicas (``_supervisor``), each
of them this same command run again with the hidden ``--supervised-fd``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from outbox._settings import Settings, parse_duration

if TYPE_CHECKING:
    from outbox.dispatcher._dispatcher import Dispatcher

log = logging.getLogger("outbox.dispatcher")


def register(commands: Any) -> None:
    """Add the ``dispatch`` subcommand to the ``outbox`` command line."""
    parser = commands.add_parser("dispatch", help="deliver messages (one replica, or N processes)")
    parser.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N|auto",
        help="dispatcher processes under one supervisor, one metrics port ('auto': one per"
        " CPU this process may use; default 1: no supervisor)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="sends in flight (32)")
    parser.add_argument("--batch-size", type=int, default=100, help="messages per claim (100)")
    parser.add_argument(
        "--urgent-reserve",
        type=int,
        default=25,
        metavar="N",
        help="in-flight slots that only the transactional lane's own claim fills, so that an"
        " alert is claimed while a campaign keeps the dispatcher busy (25; 0: off)",
    )
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
    parser.add_argument(
        "--shutdown-grace",
        default="10s",
        metavar="DURATION",
        help="on SIGTERM, how long sends under way may take to finish (10s)",
    )
    # the child's end of its supervisor's socket pair: internal, not for people
    parser.add_argument("--supervised-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_command, extra="dispatcher")


def _processes(text: str) -> int:
    from outbox.dispatcher._supervisor import parse_processes

    try:
        return parse_processes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``outbox dispatch``."""
    if args.concurrency < 1 or args.batch_size < 1:
        print("outbox: --concurrency and --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.urgent_reserve < 0:
        print("outbox: --urgent-reserve must be 0 or more", file=sys.stderr)
        return 2
    args.idle_horizon_seconds = parse_duration(args.idle_horizon)
    args.shutdown_grace_seconds = parse_duration(args.shutdown_grace)
    if args.processes > 1 and args.supervised_fd is None:
        return _supervise(args, settings)
    return asyncio.run(_main(args, settings))


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    # before any event loop or connection exists in this process: the children are
    # fresh interpreters, this process only watches them
    from outbox.dispatcher._supervisor import SupervisorOptions, child_arguments, run_supervisor

    options = SupervisorOptions(
        processes=args.processes,
        child_args=child_arguments(
            verbose=args.verbose,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            urgent_reserve=args.urgent_reserve,
            shutdown_grace=args.shutdown_grace,
            until_idle=args.until_idle,
            idle_horizon=args.idle_horizon,
        ),
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        until_idle=args.until_idle,
        metrics_port=args.metrics_port,
        dispatcher_id=settings.dispatcher_id,
    )
    return run_supervisor(settings, options)


SCHEMA_RECHECK_SECONDS = 5.0


async def _wait_for_schema(settings: Settings, stop: asyncio.Event, *, give_up: bool) -> bool:
    """Wait until the database is migrated; log the problem once, not every poll.

    Returns False when told to stop first, or at once with ``give_up`` (an
    ``--until-idle`` run is a batch job: it fails instead of waiting). An unreachable
    database is not this function's business: the dispatcher's pools ride it out.
    """
    import psycopg

    from outbox._schema_check import schema_problem_async

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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # `kill -USR1 <pid>`: every thread's stack on stderr, even with the event loop
    # stuck in a call that never returns (what a dispatcher that ignores SIGTERM is
    # doing); faulthandler writes from the signal handler, not from the loop
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    link = None
    if args.supervised_fd is not None:
        from outbox.dispatcher._supervisor import SupervisorLink

        link = SupervisorLink(args.supervised_fd)
        link.watch(loop, on_lost=stop.set)
    observer = None
    if args.metrics_port is not None:
        from outbox.dispatcher.metrics import DispatcherMetrics, serve_metrics

        observer = DispatcherMetrics()
        serve_metrics(args.metrics_port, settings)
    elif link is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # a supervised child counts into the supervisor's directory; the supervisor
        # serves the sum (children never open a port)
        from outbox.dispatcher.metrics import DispatcherMetrics

        observer = DispatcherMetrics()
    if not await _wait_for_schema(settings, stop, give_up=args.until_idle):
        return 1 if args.until_idle else 0
    dispatcher = Dispatcher(
        settings,
        build_channels(settings),
        options=DispatcherOptions(
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            urgent_reserve=args.urgent_reserve,
            until_idle=args.until_idle,
            idle_horizon=args.idle_horizon_seconds,
            shutdown_grace=args.shutdown_grace_seconds,
        ),
        observer=observer,
    )
    stopper = asyncio.create_task(_stop_when(stop, dispatcher))
    if link is not None:
        link.report_ready()
    try:
        await dispatcher.run()
    finally:
        stopper.cancel()
        if link is not None:
            link.close()
    return 0


async def _stop_when(stop: asyncio.Event, dispatcher: Dispatcher) -> None:
    await stop.wait()
    dispatcher.stop()
