"""``outbox api``: serve the HTTP API with uvicorn in the foreground."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from outbox._errors import ConfigurationError
from outbox._settings import Settings


def register(commands: Any) -> None:
    """Add the ``api`` subcommand to the ``outbox`` command line."""
    parser = commands.add_parser("api", help="serve the HTTP API (test sends, health, metrics)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.set_defaults(handler=run_command, extra="api")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Serve ``outbox api``; return 0 after a clean shutdown, 2 on bad configuration."""
    from outbox.api._app import create_app
    from outbox.api._server import serve

    if not 0 < args.port < 65536:
        print("outbox: --port must be between 1 and 65535", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except ConfigurationError as error:
        print(f"outbox: {error}", file=sys.stderr)
        return 2
    # uvicorn's access log shows paths and status codes, never headers (no tokens).
    # log_config=None: uvicorn keeps its hands off logging, so its records go through
    # outbox's set-up (OUTBOX_LOG_FORMAT, the non-blocking writer; the access log, a
    # line per request, at WARNING unless OUTBOX_LOG_LEVEL=DEBUG).
    # The inbox streams end first at shutdown (api/_server.py): SIGTERM stops the API
    # within moments, not when the last browser tab closes.
    if not serve(app, host=args.host, port=args.port, log_config=None, lifespan="on"):
        return 3  # uvicorn's own code when it could not start (the port is taken, say)
    return 0
