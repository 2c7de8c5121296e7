"""Plain text from an email's HTML, for the ``text/plain`` part, and its ``<title>``.

The text reads like an email someone typed: paragraphs and headings separated by
blank lines, list items as ``- item`` (``1. item`` when ordered), a link as
``text (url)`` (just the URL when the text is the URL), an image as its ``alt``
text, ``<hr>`` as a rule. A data table becomes one line per row with its columns
aligned; a table marked ``role="presentation"`` (a layout table, which email HTML
needs) is read as plain blocks. Nothing hidden is kept: ``<head>``, ``<style>``,
``<script>``, ``hidden`` elements and ``display:none`` ones (preheaders). Only the
standard library is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)
_SKIP = frozenset({"head", "title", "style", "script", "template", "noscript"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_PARAGRAPH = _HEADINGS | {"blockquote", "dl", "figure", "ol", "p", "pre", "table", "ul"}
_BLOCK = _PARAGRAPH | {"address", "article", "aside", "center", "dd", "div", "dt", "figcaption"}
_BLOCK |= {"footer", "form", "header", "li", "main", "nav", "section", "tbody", "td", "tfoot"}
_BLOCK |= {"th", "thead", "tr"}
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none", re.IGNORECASE)
_SPACE = re.compile(r"[ \t\r\n\f\u00a0]+")
# Closing one of these ends an open element of the keys (HTML's implied end tags).
_IMPLIED_END = {"p": {"p"}, "li": {"li"}, "tr": {"tr", "td", "th"}, "td": {"td", "th"}}
_IMPLIED_END["th"] = _IMPLIED_END["td"]


@dataclass(eq=False)
class _Element:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[_Element | str] = field(default_factory=list)


class _TreeBuilder(HTMLParser):
    """A forgiving HTML tree builder (mail HTML is rarely strict)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Element("#root")
        self._open = [self.root]
        self.title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for implied in _IMPLIED_END.get(tag, ()):
            self._close(implied, within={"table", "ul", "ol"} - {tag})
        element = _Element(tag, {k: v or "" for k, v in attrs})
        self._open[-1].children.append(element)
        if tag not in _VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(_Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        self._close(tag)

    def handle_data(self, data: str) -> None:
        if self._open[-1].tag == "title":
            self.title.append(data)
        self._open[-1].children.append(data)

    def _close(self, tag: str, within: set[str] | frozenset[str] = frozenset()) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            current = self._open[depth].tag
            if current == tag:
                del self._open[depth:]
                return
            if current in within:
                return


def extract_title(html: str) -> str:
    """Return the text of the first ``<title>``, entities decoded, spaces collapsed."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return _SPACE.sub(" ", "".join(builder.title)).strip()


def html_to_text(html: str) -> str:
    """Readable plain text for ``html`` (see the module docstring for the rules)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    out = _Output()
    _render(builder.root, out, pre=False)
    return out.text()


class _Output:
    """Collects inline text and block breaks; breaks collapse into at most one blank line."""

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._pending = 0  # newlines owed before the next text
        self._line = ""  # what the current line holds so far

    def write(self, text: str, *, pre: bool = False) -> None:
        if not pre:
            text = _SPACE.sub(" ", text)
            if self._pending or not self._line.strip() or self._line.endswith(" "):
                text = text.lstrip()
            if not text:
                return
        if self._pending and self._chunks:
            self._chunks.append("\n" * self._pending)
            self._line = ""
        self._pending = 0
        self._chunks.append(text)
        self._line = (self._line + text).rsplit("\n", 1)[-1]

    def brk(self, newlines: int) -> None:
        self._pending = max(self._pending, newlines)

    def text(self) -> str:
        lines = "".join(self._chunks).split("\n")
        return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def _hidden(element: _Element) -> bool:
    return (
        element.tag in _SKIP
        or "hidden" in element.attrs
        or bool(_HIDDEN_STYLE.search(element.attrs.get("style", "")))
    )


def _render(element: _Element, out: _Output, *, pre: bool) -> None:
    tag = element.tag
    if _hidden(element):
        return
    if tag == "br":
        out.write("\n", pre=True)
        out.brk(0)
        return
    if tag == "hr":
        out.brk(2)
        out.write("-" * 40)
        out.brk(2)
        return
    if tag == "img":
        out.write(element.attrs.get("alt", ""))
        return
    if tag == "table" and element.attrs.get("role") != "presentation":
        out.brk(2)
        _render_table(element, out)
        out.brk(2)
        return
    breaks = 2 if tag in _PARAGRAPH else 1 if tag in _BLOCK else 0
    out.brk(breaks)
    if tag == "ol":
        items = [c for c in element.children if isinstance(c, _Element) and c.tag == "li"]
        for number, item in enumerate(items, start=1):
            item.attrs.setdefault("data-ordinal", str(number))
    if tag == "li":
        out.write(_bullet(element))
    inner_pre = pre or tag == "pre"
    if tag == "a":
        _render_link(element, out, pre=pre)
    else:
        for child in element.children:
            if isinstance(child, str):
                out.write(child, pre=inner_pre)
            else:
                _render(child, out, pre=inner_pre)
    out.brk(breaks)


def _inline_text(element: _Element) -> str:
    """Return the element's content on one line."""
    sub = _Output()
    for child in element.children:
        if isinstance(child, str):
            sub.write(child)
        else:
            _render(child, sub, pre=False)
    return _SPACE.sub(" ", sub.text()).strip()


def _render_link(element: _Element, out: _Output, *, pre: bool) -> None:
    label = _inline_text(element)
    href = element.attrs.get("href", "").strip()
    target = href.removeprefix("mailto:")
    if not href or href.startswith("#") or target == label:
        out.write(label, pre=pre)
    elif not label:
        out.write(href, pre=pre)
    else:
        out.write(f"{label} ({href})", pre=pre)


def _bullet(element: _Element) -> str:
    ordinal = element.attrs.get("data-ordinal")
    return f"{ordinal}. " if ordinal else "- "


def _rows(element: _Element) -> list[list[str]]:
    rows: list[list[str]] = []
    for child in element.children:
        if isinstance(child, str) or _hidden(child):
            continue
        if child.tag == "tr":
            cells = [c for c in child.children if isinstance(c, _Element)]
            rows.append(
                [_inline_text(c) for c in cells if c.tag in ("td", "th") and not _hidden(c)]
            )
        elif child.tag in ("thead", "tbody", "tfoot"):
            rows.extend(_rows(child))
    return [row for row in rows if any(row)]


def _render_table(element: _Element, out: _Output) -> None:
    rows = _rows(element)
    if not rows:
        return
    width = max(len(row) for row in rows)
    widths = [max((len(row[i]) for row in rows if i < len(row)), default=0) for i in range(width)]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    out.write("\n".join(lines), pre=True)
