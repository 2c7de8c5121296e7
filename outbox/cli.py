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
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, requires, version
from pathlib import Path
from typing import Any

import psycopg

from outbox import __version__
from outbox._errors import ConfigurationError, OutboxError
from outbox._logging import configure_logging
from outbox._operator import (
    dead_ids,
    dead_letter_detail,
    dead_letters,
    purge_dead,
    queue_stats,
    retry_all_dead,
    retry_dead,
)
from outbox._progress import ProgressBar
from outbox._schema_check import SchemaNotReady, schema_problem
from outbox._settings import Settings, parse_duration
from outbox._table import format_table
from outbox.vocabulary import CHANNELS, LANES

Handler = Callable[[argparse.Namespace, Settings], int]

DISTRIBUTION = "pg-outbox"
# `name[extras] >=1; extra == "dispatcher"`, as the wheel's metadata writes it
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[(?P<extras>[^\]]*)\])?"
    r"[^;]*;\s*extra\s*==\s*[\"'](?P<extra>[^\"']+)[\"']\s*$"
)


def missing_requirements(extra: str) -> list[str]:
    """The distributions that ``pg-outbox[extra]`` needs and that are not installed.

    Follows self-references (``api`` needs ``pg-outbox[dispatcher]``). Empty when
    pg-outbox itself is not installed as a distribution (nothing to compare with).
    """
    try:
        declared = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return []
    by_extra: dict[str, list[tuple[str, list[str]]]] = {}
    for line in declared:
        match = _REQUIREMENT.match(line)
        if match:
            extras = [e.strip() for e in (match["extras"] or "").split(",") if e.strip()]
            by_extra.setdefault(match["extra"], []).append((match["name"], extras))
    missing: list[str] = []
    seen: set[str] = set()
    pending = [extra]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for name, extras in by_extra.get(current, []):
            if name.lower().replace("_", "-") == DISTRIBUTION:
                pending += extras
                continue
            try:
                version(name)
            except PackageNotFoundError:
                missing.append(name)
    return sorted(set(missing))


def _extra_hint(command: str, extra: str, missing: Sequence[str]) -> str:
    return (
        f"outbox {command}: needs the {extra} extra, and {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: "
        f"pip install '{DISTRIBUTION}[{extra}]'"
    )


# What a statement meets on a database that was never migrated (commands that do not
# go through _connect, such as a campaign's enqueue).
_MISSING_SCHEMA_OBJECT = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName,
)


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    """An operator's connection to a database that is migrated (else SchemaNotReady)."""
    conn = psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10)
    problem = schema_problem(conn)
    if problem is not None:
        conn.close()
        raise SchemaNotReady(problem)
    return conn


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
    with _connect(settings) as conn:
        rows = queue_stats(conn)
    if not rows:
        print("The outbox is empty: nothing pending, in flight or dead.")
        return 0
    print(format_table(["lane", "channel", "status", "count", "oldest age"], rows))
    return 0


def _cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    with _connect(settings) as conn:
        if args.dlq_command == "list":
            rows = dead_letters(conn, limit=args.limit)
            if not rows:
                print("No dead letters.")
                return 0
            print(
                format_table(
                    [
                        "id",
                        "lane",
                        "channel",
                        "user",
                        "template",
                        "tries",
                        "class",
                        "error",
                        "dead since",
                    ],
                    rows,
                )
            )
            return 0
        if args.dlq_command == "show":
            detail = dead_letter_detail(conn, args.id)
            if detail is None:
                print(f"outbox: no dead message with id {args.id}", file=sys.stderr)
                return 1
            print(detail)
            return 0
        if args.dlq_command == "retry":
            if not args.all and not args.ids:
                print("outbox: give message ids or --all", file=sys.stderr)
                return 2
            if args.batch_size < 1:
                print("outbox: --batch-size must be at least 1", file=sys.stderr)
                return 2
            if args.all or args.dry_run:
                targets = dead_ids(conn, ids=None if args.all else args.ids)
                what = f"move {len(targets)} dead message(s) back to pending"
                if not _confirmed(args, what, targets):
                    return 0 if args.dry_run else 2
            if args.all:
                count = _retry_all_with_progress(conn, args.batch_size)
            else:
                count = retry_dead(conn, args.ids)
            print(f"{count} dead message(s) back to pending.")
            return 0
        assert args.dlq_command == "purge"
        older_than = parse_duration(args.older_than)
        targets = dead_ids(conn, older_than_seconds=older_than)
        what = f"delete {len(targets)} dead message(s) older than {args.older_than}"
        if not _confirmed(args, what, targets):
            return 0 if args.dry_run else 2
        count = purge_dead(conn, older_than)
        print(f"{count} dead message(s) older than {args.older_than} deleted.")
        return 0


def _confirmed(args: argparse.Namespace, what: str, ids: Sequence[int]) -> bool:
    """Whether a destructive ``dlq`` command may go on: ``--dry-run`` prints and stops;
    ``--yes`` goes on; a terminal is asked; anything else (a script, a pipe) is refused.
    """
    shown = ", ".join(map(str, ids[:20])) + (
        f", ... ({len(ids) - 20} more)" if len(ids) > 20 else ""
    )
    if args.dry_run:
        print(f"dry run: would {what}" + (f": {shown}" if ids else "") + "; nothing changed.")
        return False
    if args.yes or not ids:
        return True
    if not sys.stdin.isatty():
        print(
            f"outbox: refusing to {what} without confirmation: add --yes"
            " (or --dry-run to list them first)",
            file=sys.stderr,
        )
        return False
    print(f"About to {what}: {shown}")
    answer = input("Go ahead? [y/N] ").strip().lower()
    if answer in ("y", "yes"):
        return True
    print("Nothing changed.")
    return False


def _retry_all_with_progress(conn: psycopg.Connection[Any], batch_size: int) -> int:
    """``dlq retry --all``: batches of ``batch_size``; a progress bar when there are more."""
    bar: ProgressBar | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total > batch_size:
            bar = ProgressBar("retrying", total=total, unit="messages")
        if bar is not None:
            bar.update(done, total=total)

    try:
        return retry_all_dead(conn, batch_size=batch_size, progress=progress)
    finally:
        if bar is not None:
            bar.close()


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
    campaign.add_argument("--channel", required=True, choices=CHANNELS)
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

    stats = commands.add_parser("stats", help="queue depth per lane, channel and status")
    stats.set_defaults(handler=_cmd_stats)

    dlq = commands.add_parser("dlq", help="inspect and redrive dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list dead messages, newest first")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_show = dlq_commands.add_parser("show", help="everything about one dead message")
    dlq_show.add_argument("id", type=int)
    dlq_retry = dlq_commands.add_parser("retry", help="back to pending, attempts reset")
    dlq_retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    dlq_retry.add_argument("--all", action="store_true", help="every dead message")
    _destructive_flags(dlq_retry)
    dlq_retry.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="with --all: messages per statement, each committed (1000)",
    )
    dlq_purge = dlq_commands.add_parser("purge", help="delete old dead messages")
    dlq_purge.add_argument(
        "--older-than", required=True, help="with a unit: 30s, 15m, 12h, 7d or 2w"
    )
    _destructive_flags(dlq_purge)
    dlq.set_defaults(handler=_cmd_dlq)

    templates = commands.add_parser("templates", help="list templates and their variables")
    templates.set_defaults(handler=_cmd_templates)

    for entry in sorted(entry_points(group="outbox.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ModuleNotFoundError as error:
            _register_unavailable(commands, entry.name, entry.module, error)
            continue
        register(commands)
    return parser


def _destructive_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would change and change nothing"
    )
    parser.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (required when not on a terminal)"
    )


def _register_unavailable(
    commands: Any, name: str, module: str, error: ModuleNotFoundError
) -> None:
    """A command whose module cannot load (its extra is not installed): it stays in
    ``--help`` and, when run, names the extra to install instead of a traceback.
    """
    if (error.name or "outbox").split(".")[0] == "outbox":
        raise error
    # outbox.dispatcher.cli -> the `dispatcher` extra
    parts = module.split(".")
    extra = parts[1] if len(parts) > 1 and parts[0] == "outbox" else name
    hint = _extra_hint(name, extra, [error.name or "?"])
    # no option prefix: whatever options the real command takes are accepted here
    parser = commands.add_parser(
        name,
        help=f"(not installed: pip install '{DISTRIBUTION}[{extra}]')",
        prefix_chars="\x00",
        add_help=False,
    )
    parser.add_argument("arguments", nargs="*", help=argparse.SUPPRESS)

    def unavailable(args: argparse.Namespace, settings: Settings) -> int:
        print(hint, file=sys.stderr)
        return 2

    parser.set_defaults(handler=unavailable, extra=extra)


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
            print(_extra_hint(args.command, extra, missing), file=sys.stderr)
            return 2
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(args, settings)
    except ModuleNotFoundError as error:
        if extra is None or (error.name or "outbox").split(".")[0] == "outbox":
            raise
        print(_extra_hint(args.command, extra, [error.name or "?"]), file=sys.stderr)
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
