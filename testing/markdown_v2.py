r"""Telegram's MarkdownV2 parser, ported from TDLib's ``parse_markdown_v2``.

The test Bot API server runs every ``parse_mode=MarkdownV2`` text through
:func:`parse_markdown_v2` and answers ``400 Bad Request: can't parse entities: ...``
exactly where Telegram would, so an escaping bug in a template or in the renderer
fails a test instead of failing in production.

Rules (https://core.telegram.org/bots/api#markdownv2-style):

* ``\\`` followed by any ASCII character (code 1..126) yields that character.
* Outside ``code`` and ``pre``, each of ``_*[]()~`>#+-=|{}.!`` must be escaped unless
  it opens or closes an entity: ``*bold*``, ``_italic_``, ``__underline__``,
  ``~strike~``, ``||spoiler||``, ``[text](url)``, ``![emoji](tg://emoji?id=1)``,
  ```code```, ````` ```pre``` `````; ``>`` is allowed at the start of a line
  (block quotation).
* Inside ``code`` and ``pre`` only ````` and ``\\`` must be escaped; inside the
  ``(url)`` of a link only ``)`` and ``\\``.
* ``__`` is read greedily as underline, as Telegram does.

The parser works on UTF-8 bytes like TDLib, so error offsets are byte offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

RESERVED = b"_*[]()~`>#+-=|{}.!"
MAX_TEXT_LENGTH = 4096


class MarkdownV2Error(ValueError):
    """The text is not valid MarkdownV2; ``str()`` is Telegram's description."""


@dataclass(frozen=True)
class Entity:
    """A parsed entity: its type, the text it covers, and a URL or language."""

    type: str
    text: str
    argument: str = ""


@dataclass(frozen=True)
class ParsedText:
    """The plain text Telegram would show, and its entities."""

    text: str
    entities: tuple[Entity, ...]


@dataclass
class _Open:
    type: str
    byte_offset: int
    begin: int  # index into the result buffer
    argument: str = ""


def _reserved(char: int) -> MarkdownV2Error:
    return MarkdownV2Error(
        f"Character '{chr(char)}' is reserved and must be escaped with the preceding '\\'"
    )


def _at(data: bytes, index: int) -> int:
    return data[index] if index < len(data) else 0


def parse_markdown_v2(text: str) -> ParsedText:
    """Parse ``text`` like Telegram; raise :class:`MarkdownV2Error` where it would."""
    data = text.encode("utf-8")
    result = bytearray()
    entities: list[Entity] = []
    stack: list[_Open] = []
    i = 0
    size = len(data)
    while i < size:
        c = data[i]
        nxt = _at(data, i + 1)
        if c == ord("\\") and 0 < nxt <= 126:
            result.append(nxt)
            i += 2
            continue
        in_code = bool(stack) and stack[-1].type in ("code", "pre")
        reserved = b"`" if in_code else RESERVED
        if c not in reserved:
            result.append(c)
            i += 1
            continue
        if c == ord(">") and (i == 0 or data[i - 1] == ord("\n")):
            i += 1  # block quotation marker at the start of a line
            continue
        top = stack[-1].type if stack else None
        closes = (
            (top == "bold" and c == ord("*"))
            or (top == "italic" and c == ord("_") and nxt != ord("_"))
            or (top == "underline" and c == ord("_") and nxt == ord("_"))
            or (top == "strikethrough" and c == ord("~"))
            or (top == "spoiler" and c == ord("|") and nxt == ord("|"))
            or (top in ("text_link", "custom_emoji") and c == ord("]"))
            or (top == "code" and c == ord("`"))
            or (top == "pre" and data[i : i + 3] == b"```")
        )
        if not closes:
            i = _open_entity(data, i, stack, len(result))
            continue
        opened = stack.pop()
        covered = bytes(result[opened.begin :]).decode("utf-8", errors="replace")
        argument = opened.argument
        if opened.type in ("underline", "spoiler"):
            i += 2
        elif opened.type == "pre":
            i += 3
        elif opened.type in ("text_link", "custom_emoji"):
            i, argument = _link_target(data, i, opened, covered)
        else:
            i += 1
        if covered:
            entities.append(Entity(opened.type, covered, argument))
    if stack:
        names = {
            "bold": "Bold",
            "italic": "Italic",
            "underline": "Underline",
            "strikethrough": "Strikethrough",
            "spoiler": "Spoiler",
            "text_link": "TextUrl",
            "custom_emoji": "CustomEmoji",
            "code": "Code",
            "pre": "Pre",
        }
        last = stack[-1]
        raise MarkdownV2Error(
            f"Can't find end of {names[last.type]} entity at byte offset {last.byte_offset}"
        )
    return ParsedText(bytes(result).decode("utf-8"), tuple(entities))


def _open_entity(data: bytes, i: int, stack: list[_Open], begin: int) -> int:
    """Push the entity that starts at ``data[i]``; return the index after its marker."""
    c = data[i]
    nxt = _at(data, i + 1)
    start = i
    argument = ""
    if c == ord("_"):
        kind, i = ("underline", i + 2) if nxt == ord("_") else ("italic", i + 1)
    elif c == ord("*"):
        kind, i = "bold", i + 1
    elif c == ord("~"):
        kind, i = "strikethrough", i + 1
    elif c == ord("|"):
        if nxt != ord("|"):
            raise _reserved(c)
        kind, i = "spoiler", i + 2
    elif c == ord("["):
        kind, i = "text_link", i + 1
    elif c == ord("!"):
        if nxt != ord("["):
            raise _reserved(c)
        kind, i = "custom_emoji", i + 2
    elif c == ord("`"):
        if data[i : i + 3] == b"```":
            kind, i = "pre", i + 3
            end = i
            while end < len(data) and data[end] not in b" \t\r\n`":
                end += 1
            if end != i and end < len(data) and data[end] != ord("`"):
                argument = data[i:end].decode("utf-8", errors="replace")
                i = end
            if i < len(data) and data[i] in b"\r\n":
                pair = data[i : i + 2]
                i += 2 if pair in (b"\r\n", b"\n\r") else 1
        else:
            kind, i = "code", i + 1
    else:
        raise _reserved(c)
    stack.append(_Open(kind, start, begin, argument))
    return i


def _link_target(data: bytes, i: int, opened: _Open, covered: str) -> tuple[int, str]:
    """Read ``(url)`` after the ``]`` at ``data[i]``; return the next index and URL."""
    if _at(data, i + 1) != ord("("):
        if opened.type == "custom_emoji":
            raise MarkdownV2Error("Custom emoji entity must contain a tg://emoji URL")
        return i + 1, covered
    i += 2
    url_begin = i
    url = bytearray()
    while i < len(data) and data[i] != ord(")"):
        if data[i] == ord("\\") and 0 < _at(data, i + 1) <= 126:
            url.append(data[i + 1])
            i += 2
            continue
        url.append(data[i])
        i += 1
    if i >= len(data):
        raise MarkdownV2Error(f"Can't find end of a URL at byte offset {url_begin}")
    return i + 1, url.decode("utf-8", errors="replace")


def escape_markdown_v2(text: str) -> str:
    """Escape plain text for MarkdownV2 (every reserved character and backslash)."""
    specials = set(RESERVED.decode()) | {"\\"}
    return "".join("\\" + ch if ch in specials else ch for ch in text)
