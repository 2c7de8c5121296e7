"""The ``outbox`` command line.

Producer-side and operator commands live here (``migrate``, ``campaign``, ``dlq``,
``stats``, ``templates``). Commands of the other packages (``dispatch``, ``api``, ``demo``)
register themselves through the ``outbox.commands`` entry-point group, so this
package never imports the dispatcher or the API: each entry point names a
``register(subparsers)`` function that adds its subcommand.

Every command reads its settings from ``OUTBOX_*`` variables once, at start-up.
Exit codes: 0 success, 1 the command failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psycopg

from outbox import __version__
from outbox._cli_dlq import add_dlq_parser
from outbox._errors import ConfigurationError, OutboxError
from outbox._extras import DISTRIBUTION, extra_hint, missing_requirements, register_unavailable
from outbox._logging import configure_logging
from outbox._operator import connect_migrated, queue_stats
from outbox._progress import ProgressBar
from outbox._schema_check import SchemaNotReady
from outbox._settings import Settings
from outbox._table import format_table
from outbox.vocabulary import CHANNELS, LANES

Handler = Callable[[argparse.Namespace, Settings], int]

# What a statement meets on a database that was never migrated (commands that do not
# go through connect_migrated, such as a campaign's enqueue).
_MISSING_SCHEMA_OBJECT = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName,
)


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox._migrate import downgrade, upgrade

    if args.downgrade:
        downgrade(settings.database_url, args.downgrade)
        print(f"outbox: downgraded to {args.downgrade}")
    else:
        upgrade(settings.database_url, args.revision)
        print(f"outbox: database migrated to {args.revision}")
    return 0


def _cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    with connect_migrated(settings) as conn:
        rows = queue_stats(conn)
    if not rows:
        print("The outbox is empty: nothing pending, in flight or dead.")
        return 0
    print(format_table(["lane", "channel", "status", "count", "oldest age"], rows))
    return 0


def _cmd_channels(args: argparse.Namespace, settings: Settings) -> int:
    from outbox._channels import list_channels, register_channel

    with connect_migrated(settings) as conn:
        if args.register:
            if not args.name:
                print("outbox: usage: outbox channels register NAME", file=sys.stderr)
                return 2
            new = register_channel(conn, args.name)
            print(f"channel {args.name} " + ("registered" if new else "was registered already"))
            return 0
        rows = [
            (c.name, "built-in" if c.builtin else "plugin", c.created_at)
            for c in list_channels(conn)
        ]
    print(format_table(["channel", "kind", "since"], rows))
    return 0


def read_user_ids(source: str) -> list[str]:
    """User ids from a file (``-``: standard input), one per line.

    Blank lines and lines starting with ``#`` are skipped; surrounding spaces are
    trimmed. Raises OSError when the file cannot be read.
    """
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def read_vars(text: str) -> Mapping[str, Any]:
    """A JSON object given inline or as ``@path``; raises ValueError otherwise."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read {text[1:]}: {error.strerror or error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--vars is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("--vars must be a JSON object")
    return value


def _cmd_campaign(args: argparse.Namespace, settings: Settings) -> int:
    from outbox._campaign import enqueue_campaign

    try:
        users = read_user_ids(args.users)
        template_vars = read_vars(args.vars)
    except OSError as error:
        print(f"outbox: cannot read {args.users}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"outbox: {error}", file=sys.stderr)
        return 2
    if not users:
        print(f"outbox: no user ids in {args.users}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("outbox: --batch-size must be at least 1", file=sys.stderr)
        return 2
    # One transaction for the whole campaign: all of it is enqueued, or none of it.
    with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
        try:
            with ProgressBar("campaign", total=len(users), unit="messages") as bar:
                result = enqueue_campaign(
                    conn,
                    users,
                    channel=args.channel,
                    template=args.template,
                    vars=template_vars,
                    lane=args.lane,
                    batch_size=args.batch_size,
                    progress=bar.update,
                )
            conn.commit()
        except (OutboxError, psycopg.Error) as error:
            conn.rollback()
            print(f"outbox: {type(error).__name__}: {error}", file=sys.stderr)
            print("outbox: rolled back; nothing was enqueued", file=sys.stderr)
            if isinstance(error, _MISSING_SCHEMA_OBJECT):
                print("outbox: the database is not migrated: run `outbox migrate`", file=sys.stderr)
            return 1
    print(
        f"{result.enqueued:,} message(s) enqueued ({args.channel}, {args.template}, "
        f"lane {args.lane}) in {result.batches} batch(es), one transaction."
    )
    return 0


def _cmd_templates(args: argparse.Namespace, settings: Settings) -> int:
    from outbox._templates import TemplateCatalog

    catalog = TemplateCatalog(extra_dir=settings.templates_dir)
    rows = [
        [
            info.name,
            ", ".join(info.channels),
            ", ".join(sorted(info.required)),
            ", ".join(sorted(info.optional)) or "-",
        ]
        for info in catalog.templates()
    ]
    print(format_table(["template", "channels", "required variables", "optional"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every built-in and registered command."""
    parser = argparse.ArgumentParser(
        prog="outbox", description="Transactional outbox for trading notifications."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version", action="version", version=f"outbox ({DISTRIBUTION}) {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply the schema (alembic upgrade heads)")
    migrate.add_argument("revision", nargs="?", default="heads", help="target (default heads)")
    migrate.add_argument("--downgrade", metavar="REVISION", help="downgrade instead (e.g. base)")
    migrate.set_defaults(handler=_cmd_migrate)

    campaign = commands.add_parser(
        "campaign", help="enqueue one template to many users, in one transaction"
    )
    campaign.add_argument(
        "--users",
        required=True,
        metavar="FILE",
        help="user ids, one per line ('-': standard input)",
    )
    campaign.add_argument(
        "--channel",
        required=True,
        help=f"channel: {', '.join(CHANNELS)} or a registered plugin's (outbox channels)",
    )
    campaign.add_argument("--template", required=True, help="template name (outbox templates)")
    campaign.add_argument(
        "--vars",
        required=True,
        metavar="JSON|@FILE",
        help="template variables: a JSON object, or @file.json",
    )
    campaign.add_argument(
        "--lane",
        default="campaign",
        choices=LANES,
        help="lane (default campaign)",
    )
    campaign.add_argument(
        "--batch-size", type=int, default=1000, help="messages per statement (1000)"
    )
    campaign.set_defaults(handler=_cmd_campaign)

    channels = commands.add_parser("channels", help="list channels, or register a plugin's")
    channels.add_argument(
        "register", nargs="?", choices=["register"], help="register NAME (outbox_operator)"
    )
    channels.add_argument("name", nargs="?", help="the new channel's name (with register)")
    channels.set_defaults(handler=_cmd_channels)

    stats = commands.add_parser("stats", help="queue depth per lane, channel and status")
    stats.set_defaults(handler=_cmd_stats)

    add_dlq_parser(commands)

    templates = commands.add_parser("templates", help="list templates and their variables")
    templates.set_defaults(handler=_cmd_templates)

    for entry in sorted(entry_points(group="outbox.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ModuleNotFoundError as error:
            register_unavailable(commands, entry.name, entry.module, error)
            continue
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``outbox`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(verbose=args.verbose)
    except ConfigurationError as error:
        print(f"outbox: configuration error: {error}", file=sys.stderr)
        return 2
    # A registered command names the extra it needs (``set_defaults(extra=...)``):
    # without it, say which one to install instead of a traceback.
    extra: str | None = getattr(args, "extra", None)
    if extra is not None:
        missing = missing_requirements(extra)
        if missing:
            print(extra_hint(args.command, extra, missing), file=sys.stderr)
            return 2
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(args, settings)
    except ModuleNotFoundError as error:
        if extra is None or (error.name or "outbox").split(".")[0] == "outbox":
            raise
        print(extra_hint(args.command, extra, [error.name or "?"]), file=sys.stderr)
        return 2
    except ConfigurationError as error:
        print(f"outbox: configuration error: {error}", file=sys.stderr)
        return 2
    except SchemaNotReady as error:
        print(f"outbox: {error}", file=sys.stderr)
        return 1
    except _MISSING_SCHEMA_OBJECT as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(
            f"outbox: {first}: the database is not migrated: run `outbox migrate`",
            file=sys.stderr,
        )
        return 1
    except (OutboxError, psycopg.Error) as error:
        print(f"outbox: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
