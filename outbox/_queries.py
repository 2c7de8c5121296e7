"""Named SQL statements, read once from ``sql/queries.sql``.

The file holds blocks that start with a ``-- name --`` header line, then one or more
comment lines saying what the statement does, then the statement itself with
``%(param)s`` placeholders::

    -- claim_batch --
    -- Lease up to %(batch_size)s due messages.
    UPDATE ...

``QUERIES["claim_batch"]`` is the statement text, comments stripped.

A block whose name starts with ``_`` is a fragment, not a statement: written once,
it is pasted wherever a statement says ``{_name}`` (the recipient columns that the
claim and the recipient lookup both return, for one).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)
_FRAGMENT = re.compile(r"\{(_[a-z0-9_]+)\}")


def read_sql_file(name: str) -> str:
    """Return the text of a file shipped in the ``sql/`` folder."""
    return resources.files("outbox.sql").joinpath(name).read_text(encoding="utf-8")


def parse_queries(text: str) -> dict[str, LiteralString]:
    """Split a queries file into ``{name: statement}``."""
    queries: dict[str, LiteralString] = {}
    headers = list(_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        body = text[header.end() : following.start() if following else len(text)]
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        statement = "\n".join(lines).strip().rstrip(";").strip()
        name = header.group(1)
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not statement:
            raise ValueError(f"query {name!r} has no statement")
        # The file ships with the package; its text is as trusted as a literal.
        queries[name] = cast(LiteralString, statement)  # type: ignore[redundant-cast]
    fragments = {name: text for name, text in queries.items() if name.startswith("_")}

    def paste(match: re.Match[str]) -> str:
        if match.group(1) not in fragments:
            raise ValueError(f"no fragment named {match.group(1)!r}")
        return fragments[match.group(1)]

    return {
        name: cast(LiteralString, _FRAGMENT.sub(paste, text))  # type: ignore[redundant-cast]
        for name, text in queries.items()
        if not name.startswith("_")
    }


@cache
def load_queries() -> dict[str, LiteralString]:
    """Return every named statement of ``sql/queries.sql`` (read once)."""
    return parse_queries(read_sql_file("queries.sql"))


class _Queries:
    def __getitem__(self, name: str) -> LiteralString:
        try:
            return load_queries()[name]
        except KeyError:
            raise KeyError(f"no query named {name!r} in sql/queries.sql") from None

    def __contains__(self, name: object) -> bool:
        return name in load_queries()


QUERIES = _Queries()
"""``QUERIES["name"]``: a statement of ``sql/queries.sql``, loaded on first use."""
