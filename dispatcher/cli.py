"""``outbox dispatch``: run one dispatcher replica in the foreground."""

from __future__ import annotations

import argparse
import asyncio
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
    asyncio.run(_main(args, settings))
    return 0


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from outbox.dispatcher._dispatcher import Dispatcher, DispatcherOptions
    from outbox.dispatcher.channels import build_channels

    observer = None
    if args.metrics_port is not None:
        from outbox.dispatcher.metrics import DispatcherMetrics, serve_metrics

        observer = DispatcherMetrics()
        serve_metrics(args.metrics_port, settings)
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
