r"""Telegram MarkdownV2: escaping per context, validation, and splitting long texts.

Escaping (what a template variable becomes):

================  ===================================================  ==============
context           characters escaped with ``\\``                       in a template
================  ===================================================  ==============
plain text        ``_ * [ ] ( ) ~ ` > # + - = | { } . !`` and ``\\``  ``{{ x }}``
code and pre      ````` and ``\\``                                     ``{{ x | code }}``
link URL          ``)`` and ``\\``                                     ``{{ x | md_url }}``
================  ===================================================  ==============

A context filter returns :class:`MarkdownV2` (text already escaped), which the
environment's ``finalize`` hook passes through, so nothing is escaped twice. The
template's own markup is template source and is never escaped.

:func:`validate` follows the parser of Telegram's servers (TDLib
``parse_markdown_v2``), slightly stricter: a ````` that does not close a code
entity and an expandable blockquote are errors. :func:`split` cuts a text into
parts of at most 4096 UTF-16 code units (Telegram's unit), each of which parses:
preferably at a blank line, a line break or a space; never inside an escape
sequence, a link URL or a custom emoji; entities open at a cut are closed at the
end of one part and reopened at the start of the next.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from outbox._templates import format_value

TELEGRAM_LIMIT = 4096
_PLAIN = re.compile(r"([_*\[\]()~`>#+\-=|{}.!\\])")
_CODE = re.compile(r"([`\\])")
_URL = re.compile(r"([)\\])")
_RESERVED = frozenset("_*[]()~`>#+-=|{}.!\n")
_PRE_OPEN = re.compile(r"```(?:([^\s`]+)(?=\s))?(\r\n|\n\r|\n|\r)?")
_LINK_CLOSE = re.compile(r"\]\((?:\\[\x01-\x7e]|[^)\\]|\\(?![\x01-\x7e]))*\)")
_VERBATIM = ("code", "pre")


class MarkdownV2Error(ValueError):
    """Text that Telegram would reject with parse_mode MarkdownV2."""


class MarkdownV2(str):
    """Text already escaped for its MarkdownV2 context; never escaped again."""

    __slots__ = ()


def escape_text(text: str) -> str:
    """Escape ``text`` for plain-text context (outside code, pre and link URLs)."""
    return _PLAIN.sub(r"\\\1", text)


def escape_code(text: str) -> str:
    """Escape ``text`` for the inside of a code or pre entity."""
    return _CODE.sub(r"\\\1", text)


def escape_url(text: str) -> str:
    """Escape ``text`` for the ``(...)`` part of an inline link."""
    return _URL.sub(r"\\\1", text)


def finalize(value: object) -> object:
    """Environment ``finalize`` hook: escape every output for plain-text context."""
    return value if isinstance(value, MarkdownV2) else MarkdownV2(escape_text(str(value)))


def code(value: object) -> MarkdownV2:
    """Filter ``code``: the value escaped for inside `` `...` `` or `` ```...``` ``."""
    return MarkdownV2(escape_code(str(format_value(value))))


def md_url(value: object) -> MarkdownV2:
    """Filter ``md_url``: the value escaped for inside ``[text](...)``."""
    return MarkdownV2(escape_url(str(format_value(value))))


FILTERS: dict[str, Callable[..., Any]] = {"code": code, "md_url": md_url}
"""Context filters to register in the Telegram environment."""


@dataclass(eq=False, slots=True)
class _Entity:
    kind: str
    reopen: str
    close: str = ""
    splittable: bool = True


@dataclass(frozen=True, slots=True)
class _Token:
    src: str
    text: str = ""
    opens: _Entity | None = None
    closes: _Entity | None = None
    marker: bool = False  # a ">" continuing an open blockquote
    literal_backslash: bool = False
    stack: tuple[_Entity, ...] = field(default=())  # entities open after this token

    @property
    def content(self) -> bool:
        return self.opens is None and self.closes is None and not self.marker


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _tokens(text: str) -> list[_Token]:
    """Tokenize and validate ``text``; raise :class:`MarkdownV2Error`."""
    out: list[_Token] = []
    stack: list[_Entity] = []
    line_start, n, i = True, len(text), 0

    def emit(src: str, **kw: Any) -> None:
        out.append(_Token(src, stack=tuple(stack), **kw))

    def reserved(char: str) -> MarkdownV2Error:
        return MarkdownV2Error(f"character {char!r} at offset {i} must be escaped with '\\'")

    while i < n:
        c, nxt = text[i], text[i + 1 : i + 2]
        top = stack[-1] if stack else None
        if c == "\\" and nxt and 0 < ord(nxt) <= 126:
            emit(text[i : i + 2], text=nxt)
            line_start = nxt == "\n" or (line_start and nxt == "\r")
            i += 2
            continue
        verbatim = top is not None and top.kind in _VERBATIM
        if (c != "`") if verbatim else (c not in _RESERVED):
            emit(c, text=c, literal_backslash=c == "\\")
            line_start = line_start and c == "\r"
            i += 1
            continue
        quoted = any(e.kind == "quote" for e in stack)
        if quoted and c == "\n" and nxt != ">":
            if top is None or top.kind != "quote":
                raise MarkdownV2Error(f"entity {top.kind if top else '?'} crosses a quote end")
            stack.pop()
            emit("\n", text="\n", closes=top)
            line_start, i = True, i + 1
            continue
        closer = _closer(top, text, i) if top is not None else None
        if top is not None and closer is not None:
            stack.pop()
            top.close = closer
            emit(closer, closes=top)
            i += len(closer)
            continue
        if verbatim:
            raise reserved(c)
        if c == "\n":
            emit("\n", text="\n")
            line_start, i = True, i + 1
            continue
        if c == ">":
            if not line_start:
                raise reserved(c)
            if quoted:
                emit(">", marker=True)
            else:
                entity = _Entity("quote", ">")
                stack.append(entity)
                emit(">", opens=entity)
            i += 1
            continue
        entity, src = _opener(text, i, reserved)
        if entity.kind in ("link", "emoji") and any(e.kind in ("link", "emoji") for e in stack):
            raise MarkdownV2Error(f"a link inside a link at offset {i}")
        stack.append(entity)
        emit(src, opens=entity)
        i += len(src)
    if stack and stack[-1].kind == "quote":
        stack.pop()
    if stack:
        raise MarkdownV2Error(f"no end of the {stack[-1].kind} entity")
    return out


def _opener(text: str, i: int, reserved: Callable[[str], MarkdownV2Error]) -> tuple[_Entity, str]:
    c = text[i]
    pair = text[i : i + 2]
    if pair == "__":
        return _Entity("underline", "__"), "__"
    if pair == "||":
        return _Entity("spoiler", "||"), "||"
    if pair == "![":
        return _Entity("emoji", "![", splittable=False), "!["
    simple = {"_": "italic", "*": "bold", "~": "strike", "[": "link"}
    if c in simple:
        return _Entity(simple[c], c), c
    if text.startswith("```", i):
        match = _PRE_OPEN.match(text, i)
        assert match is not None
        language = match.group(1) or ""
        return _Entity("pre", f"```{language}\n"), match.group(0)
    if c == "`":
        return _Entity("code", "`"), "`"
    raise reserved(c)


def _closer(top: _Entity, text: str, i: int) -> str | None:
    """Return the closing delimiter of ``top`` at ``text[i]``, if one is there."""
    c, nxt = text[i], text[i + 1 : i + 2]
    kind = top.kind
    if kind in ("bold", "strike", "code"):
        return c if c == {"bold": "*", "strike": "~", "code": "`"}[kind] else None
    if kind == "italic":
        return c if c == "_" and nxt != "_" else None
    if kind in ("underline", "spoiler"):
        pair = "__" if kind == "underline" else "||"
        return pair if text.startswith(pair, i) else None
    if kind == "pre":
        return "```" if text.startswith("```", i) else None
    if kind in ("link", "emoji") and c == "]":
        if nxt != "(":
            if kind == "emoji":
                raise MarkdownV2Error(f"custom emoji at offset {i} needs a tg://emoji URL")
            top.splittable = False  # the text is the URL: cutting it would change it
            return "]"
        match = _LINK_CLOSE.match(text, i)
        if match is None:
            raise MarkdownV2Error(f"no end of the URL at offset {i + 2}")
        return match.group(0)
    return None


def validate(text: str) -> None:
    """Raise :class:`MarkdownV2Error` unless Telegram would parse ``text``."""
    _tokens(text)


def plain_text(text: str) -> str:
    """Return the text Telegram shows for ``text``, markup removed; validates too."""
    return "".join(token.text for token in _tokens(text))


def split(text: str, limit: int = TELEGRAM_LIMIT) -> tuple[str, ...]:
    """Cut valid MarkdownV2 ``text`` into parts of at most ``limit`` UTF-16 units.

    Each part parses on its own and the parts show the same text as ``text`` (a
    part of only whitespace is dropped). Raises :class:`MarkdownV2Error` when the
    text is invalid, or when a piece that cannot be cut (a link URL, a custom
    emoji) does not fit in ``limit``.
    """
    tokens = _tokens(text)
    if _units(text) <= limit:
        return (text,) if text.strip() else ()
    parts: list[str] = []
    start, prefix = 0, ""
    while start < len(tokens):
        length, end, candidates = _units(prefix), start, []
        while end < len(tokens):
            token = tokens[end]
            closing = sum(_units(e.close) for e in token.stack)
            if length + _units(token.src) + closing > limit:
                break
            length += _units(token.src)
            score = _cut_score(tokens, end)
            if score:
                candidates.append((length >= limit // 2, score, end))
            end += 1
        if end == len(tokens):
            parts.append(prefix + "".join(t.src for t in tokens[start:]))
            break
        if not candidates:
            raise MarkdownV2Error(f"no place to cut the text into parts of {limit} characters")
        half, score, cut = max(candidates)
        if not half:
            cut = candidates[-1][2]
        stack = tokens[cut].stack
        body = "".join(t.src for t in tokens[start : cut + 1])
        parts.append(prefix + body + "".join(e.close for e in reversed(stack)))
        prefix = "".join(e.reopen for e in stack)
        start = cut + 1
        if start < len(tokens) and tokens[start].marker:
            start += 1  # the reopened ">" stands for it
    return tuple(part for part in parts if part.strip())


def _cut_score(tokens: list[_Token], i: int) -> int:
    """How good a cut after ``tokens[i]`` is: 0 never, 4 after a blank line."""
    token = tokens[i]
    following = tokens[i + 1] if i + 1 < len(tokens) else None
    if token.literal_backslash or token.opens is not None or token.marker:
        return 0
    if token.stack:
        if not token.content or following is None:
            return 0
        if not (following.content or following.marker):
            return 0
        if any(not e.splittable for e in token.stack):
            return 0
        if any(e.kind == "quote" for e in token.stack[1:]):
            return 0
    if (following is not None and _joins_previous(following.text)) or token.text == "\u200d":
        return 0
    if token.text == "\n":
        return 4 if i > 0 and tokens[i - 1].text == "\n" else 3
    return 2 if token.text.isspace() else 1


def _joins_previous(text: str) -> bool:
    """Whether ``text`` belongs to the character before it (accents, emoji joiners)."""
    if not text:
        return False
    char = text[0]
    return (
        unicodedata.category(char) in ("Mn", "Me")
        or char in "\u200d\ufe0e\ufe0f"
        or ("\U0001f3fb" <= char <= "\U0001f3ff")
    )
