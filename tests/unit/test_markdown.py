"""MarkdownV2: variables escaped per context, template markup kept, long texts split.

Validity is checked against ``outbox.testing.markdown_v2``, an independent port of
Telegram's parser (the one the test Bot API server uses), not only against the
validator under test.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox._templates import TemplateCatalog
from outbox.dispatcher import markdown
from outbox.dispatcher._environments import environments
from outbox.dispatcher.markdown import (
    MarkdownV2Error,
    escape_code,
    escape_text,
    escape_url,
    plain_text,
    split,
    validate,
)
from outbox.testing.markdown_v2 import ParsedText, parse_markdown_v2

SPECIALS = "_*[]()~`>#+-=|{}.!"


def render(source: str, **vars: Any) -> str:
    """Render ``source`` in the very environment the dispatcher uses for Telegram."""
    env = environments(TemplateCatalog(builtin=False)).telegram
    return env.from_string(source).render(vars)


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def covered(parsed: ParsedText, kind: str) -> str:
    return "".join(entity.text for entity in parsed.entities if entity.type == kind)


def test_every_special_character_and_the_backslash_in_a_variable_arrives_escaped() -> None:
    value = SPECIALS + "\\"
    out = render("{{ x }}", x=value)
    assert out == "".join("\\" + char for char in value)
    assert parse_markdown_v2(out).text == value
    assert parse_markdown_v2(out).entities == ()


def test_the_templates_own_bold_and_italic_markup_survives() -> None:
    out = render("*{{ a }}* and _{{ b }}_ and __{{ c }}__", a="2*3", b="snake_case", c="x_")
    parsed = parse_markdown_v2(out)
    assert parsed.text == "2*3 and snake_case and x_"
    assert [(e.type, e.text) for e in parsed.entities] == [
        ("bold", "2*3"),
        ("italic", "snake_case"),
        ("underline", "x_"),
    ]


def test_inside_code_only_the_backtick_and_the_backslash_are_escaped() -> None:
    value = "a`b\\c_*.!"
    out = render("`{{ x | code }}` ```\n{{ x | code }}```", x=value)
    assert out.startswith("`a\\`b\\\\c_*.!`")
    parsed = parse_markdown_v2(out)
    assert [(e.type, e.text) for e in parsed.entities] == [("code", value), ("pre", value)]


def test_inside_a_link_url_only_the_closing_parenthesis_and_backslash_are_escaped() -> None:
    url = "https://p.example/a_(b)\\c?d=1.2"
    out = render("[{{ label }}]({{ url | md_url }})", label="Open [it].", url=url)
    (link,) = parse_markdown_v2(out).entities
    assert (link.type, link.text, link.argument) == ("text_link", "Open [it].", url)


def test_a_context_filter_is_not_escaped_a_second_time() -> None:
    assert render("`{{ x | code }}`", x="a.b") == "`a.b`"
    assert render("{{ x | code | upper }}", x="a.b") == "A\\.B"  # a later filter loses it


def test_template_syntax_in_a_variable_arrives_literally() -> None:
    out = render("{{ x }}", x="{{ 7*7 }}{% raw %}")
    assert parse_markdown_v2(out).text == "{{ 7*7 }}{% raw %}"


def test_numbers_keep_every_digit_and_are_escaped() -> None:
    assert render("{{ a }} {{ b }} {{ c }}", a=1.08345, b=0.00001, c=-5) == (
        "1\\.08345 0\\.00001 \\-5"
    )


def test_a_10000_character_variable_yields_parts_of_at_most_4096_characters_each_valid() -> None:
    value = ("Margin call on EURUSD (broker code #134)! " * 250)[:10_000]
    text = render(
        "*Reason:* {{ reason }}\n\n_Ticket:_ `{{ ticket | code }}`", reason=value, ticket=7
    )
    parts = split(text)
    assert len(text) > 10_000
    assert len(parts) >= 3
    for part in parts:
        assert len(part) <= 4096
        assert units(part) <= 4096
        parse_markdown_v2(part)
    assert "".join(parse_markdown_v2(p).text for p in parts) == parse_markdown_v2(text).text


def test_a_long_entity_is_closed_and_reopened_across_parts() -> None:
    value = "word " * 3000
    text = render("*{{ a }}*\n```python\n{{ b | code }}```", a=value, b="x = 1\n" * 900)
    parts = split(text)
    original = parse_markdown_v2(text)
    parsed = [parse_markdown_v2(part) for part in parts]
    assert len(parts) > 2
    for kind in ("bold", "pre"):
        assert "".join(covered(p, kind) for p in parsed) == covered(original, kind)
    languages = {e.argument for p in parsed for e in p.entities if e.type == "pre"}
    assert languages == {"python"}


def test_a_split_prefers_paragraphs_then_lines_over_words() -> None:
    text = "\n\n".join(escape_text(f"Paragraph {n}. " + "x" * 40) for n in range(6))
    parts = split(text, limit=120)
    assert all(part.startswith("Paragraph") for part in parts)
    assert all(part.endswith("x") or part.endswith("\n\n") for part in parts)


def test_a_split_never_cuts_an_escape_sequence_a_url_or_an_emoji_sequence() -> None:
    text = escape_text("a." * 60) + "[link](https://p.example/\\)x) " + "👍🏽" * 30
    for limit in range(40, 90):
        for part in split(text, limit=limit):
            assert units(part) <= limit
            parsed = parse_markdown_v2(part)
            assert not part.endswith("\\") or part.endswith("\\\\")
            for entity in parsed.entities:
                assert entity.argument == "https://p.example/)x"
            assert not part.startswith("\U0001f3fd")


def test_a_short_text_is_one_part_and_a_blank_one_none() -> None:
    assert split("*hi*") == ("*hi*",)
    assert split("   ") == ()


def test_a_piece_that_cannot_be_cut_and_does_not_fit_raises() -> None:
    text = "[a](" + "https://p.example/" + "x" * 200 + ") " + "b " * 100
    with pytest.raises(MarkdownV2Error, match="no place to cut"):
        split(text, limit=100)


@pytest.mark.parametrize(
    "text",
    [
        "Price 1.5",
        "*bold",
        "_it",
        "[a](b",
        "`code",
        "```pre",
        "a > b",
        "a | b",
        "!",
        "]",
        "*a _b* c_",
        "![x](y",
        "![x]",
        "`a``",
        "[a](b\\)",
    ],
)
def test_validate_rejects_what_telegram_rejects(text: str) -> None:
    with pytest.raises(MarkdownV2Error):
        validate(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("*b* _i_ __u__ ~s~ ||sp||", "b i u s sp"),
        ("___iu_\r__", "iu\r"),
        ("[x](https://p.example/\\))", "x"),
        ("[https://p\\.example]", "https://p.example"),
        ("![👍](tg://emoji?id=5368324170671202286)", "👍"),
        (">quoted\n>more\nafter", "quoted\nmore\nafter"),
        ("```python\nprint(1)```", "print(1)"),
        ("```\ncode```", "code"),
        ("\\\\ \\é", "\\ \\é"),
        ("a\\\n>b", "a\nb"),
    ],
)
def test_validate_accepts_what_telegram_accepts(text: str, shown: str) -> None:
    validate(text)
    assert plain_text(text) == shown == parse_markdown_v2(text).text


ALPHABET = list("ab c\n" + SPECIALS + "\\é👍")


@settings(max_examples=300, database=None, deadline=None)
@given(st.text(alphabet=[c for c in ALPHABET if c != ">"], max_size=40))
def test_text_the_validator_accepts_parses_the_same_in_telegrams_parser(text: str) -> None:
    # ">" is left out: the reference parser simplifies blockquotes (TDLib also
    # accepts a ">" right after entity markers at a line start, as in "*>").
    try:
        validate(text)
    except MarkdownV2Error:
        return
    assert parse_markdown_v2(text).text == plain_text(text)


SEGMENT_KINDS = ["plain", "bold", "italic", "underline", "strike", "spoiler", "bold_italic"]
SEGMENT_KINDS += ["code", "pre", "link", "quote"]


def build(segments: list[tuple[str, str]]) -> str:
    wrap = {"bold": "*", "italic": "_", "underline": "__", "strike": "~", "spoiler": "||"}
    out = []
    for kind, text in segments:
        if kind in wrap:
            out.append(f"{wrap[kind]}{escape_text(text)}{wrap[kind]}")
        elif kind == "bold_italic":
            out.append(f"*_{escape_text(text)}_*")
        elif kind == "code":
            out.append(f"`{escape_code(text)}`")
        elif kind == "pre":
            out.append(f"```python\n{escape_code(text)}```")
        elif kind == "link":
            out.append(f"[{escape_text(text)}]({escape_url('https://p.example/' + text[:12])})")
        elif kind == "quote":
            out.append(f"\n>{escape_text(text.replace(chr(10), ' '))}\n")
        else:
            out.append(escape_text(text))
    return " ".join(out)


@settings(max_examples=300, database=None, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(SEGMENT_KINDS),
            st.text(alphabet=ALPHABET, min_size=1, max_size=80).filter(str.strip),
        ),
        max_size=10,
    ),
    st.integers(min_value=60, max_value=400),
)
def test_every_part_of_a_split_parses_and_together_they_show_the_same_text(
    segments: list[tuple[str, str]], limit: int
) -> None:
    text = build(segments)
    validate(text)
    original = parse_markdown_v2(text)
    parts = split(text, limit=limit)
    parsed = [parse_markdown_v2(part) for part in parts]
    assert all(units(part) <= limit for part in parts)

    def squeeze(value: str) -> str:
        return re.sub(r"\s", "", value)

    assert squeeze("".join(p.text for p in parsed)) == squeeze(original.text)
    for kind in ("bold", "italic", "underline", "strikethrough", "spoiler", "code", "pre"):
        assert squeeze("".join(covered(p, kind) for p in parsed)) == squeeze(
            covered(original, kind)
        )
    links = {e.argument for p in parsed for e in p.entities if e.type == "text_link"}
    assert links <= {e.argument for e in original.entities if e.type == "text_link"}


def test_the_telegram_filters_are_the_ones_the_environment_registers() -> None:
    assert set(markdown.FILTERS) == {"code", "md_url"}
