"""The test Bot API server's MarkdownV2 parser accepts and refuses what Telegram does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.testing.markdown_v2 import (
    Entity,
    MarkdownV2Error,
    escape_markdown_v2,
    parse_markdown_v2,
)

# The examples of https://core.telegram.org/bots/api#markdownv2-style
NESTED = (
    r"*bold _italic bold ~italic bold strikethrough ||italic bold strikethrough spoiler||~ "
    r"__underline italic bold___ bold*"
)
TELEGRAM_EXAMPLE = r"""*bold \*text*
_italic \*text_
__underline__
~strikethrough~
||spoiler||
NESTED
[inline URL](http://www.example.com/)
[inline mention of a user](tg://user?id=123456789)
![👍](tg://emoji?id=5368324170671202286)
`inline fixed-width code`
```
pre-formatted fixed-width code block
```
```python
pre-formatted fixed-width code block written in the Python programming language
```
>Block quotation started
>Block quotation continued
>The last line of the block quotation""".replace("NESTED", NESTED)


def test_the_example_from_the_bot_api_documentation_parses() -> None:
    parsed = parse_markdown_v2(TELEGRAM_EXAMPLE)

    assert parsed.text.startswith("bold *text\nitalic *text\nunderline\n")
    assert Entity("bold", "bold *text") in parsed.entities
    assert Entity("underline", "underline italic bold") in parsed.entities
    assert Entity("text_link", "inline URL", "http://www.example.com/") in parsed.entities
    assert Entity("pre", "pre-formatted fixed-width code block\n") in parsed.entities
    assert any(e.type == "pre" and e.argument == "python" for e in parsed.entities)
    assert "Block quotation continued" in parsed.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("EURUSD at 1.1000", "Character '.' is reserved"),
        ("loss -35", "Character '-' is reserved"),
        ("a (b)", "Character '(' is reserved"),
        ("a | b", "Character '|' is reserved"),
        ("wow!", "Character '!' is reserved"),
        ("#42", "Character '#' is reserved"),
        ("x > y", "Character '>' is reserved"),
        ("*bold", "Can't find end of Bold entity at byte offset 0"),
        ("🚨 _italic", "Can't find end of Italic entity at byte offset 5"),
        ("`code", "Can't find end of Code entity"),
        ("```\npre", "Can't find end of Pre entity"),
        ("[link](http://example.com", "Can't find end of a URL"),
        ("![x]", "Custom emoji entity must contain a tg://emoji URL"),
    ],
)
def test_what_telegram_refuses_is_refused(text: str, message: str) -> None:
    with pytest.raises(MarkdownV2Error, match=message.replace("(", r"\(").replace("|", r"\|")):
        parse_markdown_v2(text)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        (r"EURUSD at 1\.1000 \(\-3\.5%\)", "EURUSD at 1.1000 (-3.5%)"),
        (r"`a.b-c (d) \` \\`", "a.b-c (d) ` \\"),
        (r"[x](http://e.com/a\)b)", "x"),
        ("trailing backslash \\", "trailing backslash \\"),
        ("ümlaut \\ä stays", "ümlaut \\ä stays"),
    ],
)
def test_escapes_and_code_follow_telegram(text: str, plain: str) -> None:
    assert parse_markdown_v2(text).text == plain


@settings(database=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_escaped_text_parses_back_to_itself(text: str) -> None:
    assert parse_markdown_v2(escape_markdown_v2(text)).text == text
