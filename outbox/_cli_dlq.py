"""``outbox dlq``: list, show, redrive and purge dead letters.

``retry --all`` and ``purge`` change many rows at once: both take ``--dry-run``,
ask on a terminal and refuse without ``--yes`` anywhere else (a script, a pipe).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from outbox._operator import (
    connect_migrated,
    dead_ids,
    dead_letter_detail,
    dead_letters,
    purge_dead,
    retry_all_dead,
    retry_dead,
)
from outbox._progress import ProgressBar
from outbox._settings import Settings, parse_duration
from outbox._table import format_table


def add_dlq_parser(commands: Any) -> None:
    """Add ``dlq`` and its actions to the ``outbox`` command's subparsers."""
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


def _destructive_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would change and change nothing"
    )
    parser.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (required when not on a terminal)"
    )


def _cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    with connect_migrated(settings) as conn:
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
