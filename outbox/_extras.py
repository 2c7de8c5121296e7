"""What an install lacks: the extras of pg-outbox, and the hint that names the one to add.

The bare install is the producer; each process kind has an extra
(``pg-outbox[dispatcher]``, ``[api]``, ``[demo]`` ...). A command whose extra is
missing says which ``pip install`` fixes it instead of printing a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, requires, version
from typing import Any

from outbox._settings import Settings

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


def extra_hint(command: str, extra: str, missing: Sequence[str]) -> str:
    return (
        f"outbox {command}: needs the {extra} extra, and {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: "
        f"pip install '{DISTRIBUTION}[{extra}]'"
    )


def register_unavailable(commands: Any, name: str, module: str, error: ModuleNotFoundError) -> None:
    """A command whose module cannot load (its extra is not installed): it stays in
    ``--help`` and, when run, names the extra to install instead of a traceback.
    """
    if (error.name or "outbox").split(".")[0] == "outbox":
        raise error
    # outbox.dispatcher.cli -> the `dispatcher` extra
    parts = module.split(".")
    extra = parts[1] if len(parts) > 1 and parts[0] == "outbox" else name
    hint = extra_hint(name, extra, [error.name or "?"])
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
