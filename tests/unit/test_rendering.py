"""Rendering for each channel: snapshots of the built-ins, escaping, sandbox, limits.

Snapshots live in ``tests/unit/snapshots/<channel>/``; they are reviewed by a person
before they are committed. ``OUTBOX_UPDATE_SNAPSHOTS=1`` rewrites them instead of
comparing (then read the diff before committing).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from outbox._errors import TemplateRenderError
from outbox._templates import CHANNELS, TemplateCatalog
from outbox.dispatcher.channels.base import (
    RenderedEmail,
    RenderedInApp,
    RenderedPush,
    RenderedSms,
    RenderedTelegram,
)
from outbox.dispatcher.rendering import (
    EMAIL_SIZE_LIMIT,
    PUSH_PAYLOAD_LIMIT,
    TELEGRAM_MAX_PARTS,
    push_topic,
    render,
)
from outbox.testing.markdown_v2 import parse_markdown_v2

SNAPSHOTS = Path(__file__).parent / "snapshots"
BASE_URL = "https://platform.example.com"
SAMPLES: dict[str, dict[str, Any]] = {
    "position_failure_entry": {
        "instrument": "EURUSD",
        "side": "buy",
        "entry_price": 1.08345,
        "volume": 0.5,
        "error_reason": "Insufficient margin (broker code 134)",
        "approval_id": "apr_7f3a9c",
    },
    "position_failure_sl": {
        "instrument": "XAUUSD",
        "side": "sell",
        "entry_price": 2341.5,
        "current_price": 2368.25,
        "loss_amount": -267.5,
        "broker_ticket": 88123456,
        "currency": "USD",
    },
    "position_failure_tp": {
        "instrument": "GBPJPY",
        "side": "buy",
        "entry_price": 191.204,
        "current_price": 193.87,
        "profit_amount": 412.8,
        "broker_ticket": "T-55012",
    },
    "price_alert": {
        "instrument": "BTCUSD",
        "trigger_price": 65000,
        "current_price": 65012.5,
        "condition": "above",
    },
}
SUBJECTS = {  # DESIGN section 6, with the sample values
    "position_failure_entry": "⚠️ Manual Trade Entry Required - EURUSD",
    "position_failure_sl": "🚨 URGENT: Manual Stop Loss Close Required",
    "position_failure_tp": "✅ Manual Take Profit Close Required",
    "price_alert": "Price alert: BTCUSD above 65000",
}


def rendered(
    channel: str, name: str, catalog: TemplateCatalog | None = None, **changes: Any
) -> Any:
    vars = {**SAMPLES.get(name, {}), **changes}
    return render(
        catalog or TemplateCatalog(),
        channel,
        name,
        vars,
        message_id=42,
        lane="transactional",
        platform_base_url=BASE_URL,
    )


def extra(tmp_path: Path, files: dict[str, str]) -> TemplateCatalog:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return TemplateCatalog(tmp_path)


def matches_snapshot(relative: str, actual: str) -> None:
    path = SNAPSHOTS / relative
    if os.environ.get("OUTBOX_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.is_file(), f"no snapshot {path}; run with OUTBOX_UPDATE_SNAPSHOTS=1 and review"
    assert actual == path.read_text(encoding="utf-8"), f"{relative} differs from its snapshot"


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("channel", CHANNELS)
def test_every_builtin_template_renders_as_its_reviewed_snapshot(channel: str, name: str) -> None:
    content = rendered(channel, name)
    if isinstance(content, RenderedEmail):
        matches_snapshot(f"email/{name}.html", content.html)
        matches_snapshot(f"email/{name}.txt", f"Subject: {content.subject}\n\n{content.text}")
    elif isinstance(content, RenderedTelegram):
        parts = "\n----- next part -----\n".join(content.parts)
        matches_snapshot(f"telegram/{name}.md", parts + "\n")
    elif isinstance(content, RenderedSms):
        header = f"{content.encoding}, {content.segments} segment(s)"
        matches_snapshot(f"sms/{name}.txt", f"{header}\n\n{content.text}\n")
    elif isinstance(content, RenderedInApp):
        item = {"title": content.title, "body": content.body, "url": content.url}
        matches_snapshot(
            f"inapp/{name}.json", json.dumps(item, indent=2, ensure_ascii=False) + "\n"
        )
    else:
        assert isinstance(content, RenderedPush)
        document = {"topic": content.topic, "payload": content.payload}
        pretty = json.dumps(document, indent=2, ensure_ascii=False)
        matches_snapshot(f"push/{name}.json", pretty + "\n")


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_the_email_subjects_match_the_design_exactly(name: str) -> None:
    assert rendered("email", name).subject == SUBJECTS[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_builtin_telegram_text_parses_as_markdown_v2(name: str) -> None:
    (part,) = rendered("telegram", name).parts
    parse_markdown_v2(part)


def test_the_stop_loss_alert_reads_as_urgent_and_the_take_profit_one_as_calm() -> None:
    for channel in ("telegram", "push"):
        stop_loss = str(rendered(channel, "position_failure_sl").__dict__)
        take_profit = str(rendered(channel, "position_failure_tp").__dict__)
        assert "URGENT" in stop_loss and "now" in stop_loss
        assert "URGENT" not in take_profit and "🚨" not in take_profit


def test_a_script_tag_in_a_variable_is_escaped_in_the_html() -> None:
    email = rendered("email", "position_failure_entry", instrument="<script>alert(1)</script>")
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert email.subject == "⚠️ Manual Trade Entry Required - <script>alert(1)</script>"


def test_template_syntax_in_a_variable_arrives_literally_on_every_channel() -> None:
    for channel in CHANNELS:
        content = rendered(channel, "price_alert", instrument="{{ 7*7 }}")
        assert "49" not in str(content.__dict__)
    assert rendered("email", "price_alert", instrument="{{ 7*7 }}").subject.startswith(
        "Price alert: {{ 7*7 }}"
    )


def test_a_template_that_reaches_python_internals_fails_in_the_sandbox(tmp_path: Path) -> None:
    catalog = extra(
        tmp_path,
        {"telegram/escape.md.j2": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
    )
    with pytest.raises(TemplateRenderError, match="unsafe"):
        rendered("telegram", "escape", catalog)


def test_a_template_cannot_change_data_it_is_given(tmp_path: Path) -> None:
    catalog = extra(tmp_path, {"telegram/mutate.md.j2": "{{ items.append(1) }}"})
    with pytest.raises(TemplateRenderError):
        rendered("telegram", "mutate", catalog, items=[])


def test_a_missing_variable_is_a_render_error_naming_it_never_empty_text() -> None:
    vars = {k: v for k, v in SAMPLES["price_alert"].items() if k != "current_price"}
    for channel in CHANNELS:
        with pytest.raises(TemplateRenderError, match="current_price"):
            render(TemplateCatalog(), channel, "price_alert", vars, message_id=1,
                   lane="transactional", platform_base_url=BASE_URL)  # fmt: skip


def test_an_undefined_attribute_is_a_render_error_never_empty_text(tmp_path: Path) -> None:
    catalog = extra(tmp_path, {"telegram/order.md.j2": "Order {{ order.id }}"})
    with pytest.raises(TemplateRenderError, match="id"):
        rendered("telegram", "order", catalog, order={"side": "buy"})


def test_an_unknown_template_and_vars_that_are_not_an_object_are_render_errors() -> None:
    with pytest.raises(TemplateRenderError, match="margin_call"):
        rendered("email", "margin_call")
    with pytest.raises(TemplateRenderError, match="JSON object"):
        render(TemplateCatalog(), "push", "price_alert", ["x"], message_id=1,  # type: ignore[arg-type]
               lane="transactional", platform_base_url=BASE_URL)  # fmt: skip


def test_the_renderers_own_names_win_over_variables_of_the_same_name() -> None:
    push = rendered("push", "price_alert", platform_base_url="https://evil.example")
    assert push.payload["data"]["url"] == f"{BASE_URL}/dashboard/positions"


def test_a_var_named_platform_url_does_not_hide_the_renderers_function(tmp_path: Path) -> None:
    catalog = extra(tmp_path, {"telegram/link.md.j2": "{{ platform_url(path) }}"})
    for name, vars in (("price_alert", {}), ("link", {"path": "/p"})):
        telegram = rendered("telegram", name, catalog, platform_url="https://evil.example", **vars)
        assert "evil" not in "".join(telegram.parts)


def test_platform_url_of_a_constant_reads_as_when_called_at_render(tmp_path: Path) -> None:
    """Computed once when the template compiles, it is what the call would return:
    escaped for the channel, for this renderer's base URL, and left to the call where
    the template could change what it returns or cannot see the base URL.
    """
    catalog = extra(
        tmp_path,
        {
            "telegram/fixed.md.j2": "{{ platform_url('/a_b') }} {{ platform_url(p) }}",
            "telegram/own_base.md.j2": "{% set platform_base_url = 'x:' %}{{ platform_url('/a') }}",
            "telegram/in_macro.md.j2": (
                "{% macro link() %}{{ platform_url('/m') }}{% endmacro %}{{ link() }}"
            ),
        },
    )
    folded, called = rendered("telegram", "fixed", catalog, p="/a_b").parts[0].split(" ")
    assert folded == called == r"https://platform\.example\.com/a\_b"
    other = render(catalog, "telegram", "fixed", {"p": "/a_b"}, message_id=1, lane="campaign",
                   platform_base_url="https://other.example/")  # fmt: skip
    folded, called = other.parts[0].split(" ")
    assert folded == called == r"https://other\.example/a\_b"
    assert rendered("telegram", "own_base", catalog).parts == ("x:/a",)
    # a macro's output is escaped again where it is output (as before this folding)
    in_macro = rendered("telegram", "in_macro", catalog).parts
    assert in_macro == (r"https://platform\\\.example\\\.com/m",)


def test_push_payload_carries_title_body_icon_badge_and_a_platform_url() -> None:
    for name in SAMPLES:
        push = rendered("push", name)
        assert set(push.payload) == {"title", "body", "icon", "badge", "data"}
        assert (
            push.body
            == json.dumps(push.payload, ensure_ascii=False, separators=(",", ":")).encode()
        )
    entry = rendered("push", "position_failure_entry", approval_id="apr/1?x")
    assert entry.payload["data"]["url"] == f"{BASE_URL}/dashboard/approvals/apr%2F1%3Fx"
    assert rendered("push", "position_failure_sl").payload["data"]["url"] == (
        f"{BASE_URL}/dashboard/positions"
    )


def test_push_variables_are_escaped_inside_json_strings() -> None:
    tricky = 'EUR"USD\\\n</script>", "title": "x'
    push = rendered("push", "price_alert", instrument=tricky)
    assert push.payload["title"] == f"Price alert: {tricky} above 65000"
    assert set(push.payload) == {"title", "body", "icon", "badge", "data"}


def test_a_push_payload_over_3993_bytes_is_a_clear_error() -> None:
    with pytest.raises(TemplateRenderError, match=r"is \d+ bytes; Web Push allows at most 3993"):
        rendered("push", "position_failure_entry", error_reason="x" * PUSH_PAYLOAD_LIMIT)
    fits = rendered("push", "position_failure_entry", error_reason="x" * 3000)
    assert len(fits.body) <= PUSH_PAYLOAD_LIMIT


def test_a_push_template_that_is_not_a_valid_payload_is_a_render_error(tmp_path: Path) -> None:
    catalog = extra(
        tmp_path,
        {
            "push/broken.json.j2": '{"title": "{{ t }}",}',
            "push/no_url.json.j2": '{"title": "t", "body": "b"}',
        },
    )
    with pytest.raises(TemplateRenderError, match="not JSON"):
        rendered("push", "broken", catalog, t="x")
    with pytest.raises(TemplateRenderError, match="data"):
        rendered("push", "no_url", catalog)


def test_the_push_topic_is_stable_short_url_safe_and_specific() -> None:
    topic = rendered("push", "position_failure_sl").topic
    assert topic == rendered("push", "position_failure_sl").topic
    assert topic is not None and re.fullmatch(r"[A-Za-z0-9_-]{32}", topic)
    assert topic != rendered("push", "position_failure_sl", broker_ticket=1).topic
    assert topic != push_topic("position_failure_tp", SAMPLES["position_failure_sl"])
    assert push_topic("anything", {"other": 1}) is None
    # remembered topics are per template and key: the same text under another key differs
    assert push_topic("t", {"instrument": "X"}) == push_topic("t", {"instrument": "X"})
    assert push_topic("t", {"instrument": "X"}) != push_topic("t", {"broker_ticket": "X"})
    assert push_topic("t", {"instrument": "1"}) != push_topic("t", {"instrument": 1})


def test_the_push_payload_tags_the_notification_with_its_topic() -> None:
    # outbox-sw.js shows a notification under data.tag: a newer alert about the same
    # instrument replaces the one on screen.
    content = rendered("push", "price_alert")
    assert isinstance(content, RenderedPush)
    assert content.payload["data"]["tag"] == content.topic
    assert json.loads(content.body)["data"]["tag"] == content.topic
    other = rendered("push", "price_alert", instrument="GBPUSD")
    assert isinstance(other, RenderedPush) and other.payload["data"]["tag"] != content.topic


def test_a_long_telegram_text_is_split_into_valid_parts() -> None:
    reason = "Broker rejected the order (code #134: not enough money)! " * 200
    telegram = rendered("telegram", "position_failure_entry", error_reason=reason)
    assert len(telegram.parts) == 4
    for part in telegram.parts:
        assert len(part) <= 4096
        parse_markdown_v2(part)


def test_a_text_of_more_than_ten_telegram_messages_is_a_render_error() -> None:
    """256 KiB of vars would otherwise become about 64 messages in the user's chat."""
    reason = "x" * (4096 * (TELEGRAM_MAX_PARTS + 1))
    with pytest.raises(TemplateRenderError, match=r"needs 1[12] messages; at most 10 are sent"):
        rendered("telegram", "position_failure_entry", error_reason=reason)
    fits = rendered("telegram", "position_failure_entry", error_reason="x" * 30_000)
    assert 8 <= len(fits.parts) <= TELEGRAM_MAX_PARTS


def test_an_email_over_one_mebibyte_is_a_render_error(tmp_path: Path) -> None:
    catalog = extra(
        tmp_path,
        {"email/echo.html.j2": "<title>t</title>{% for _ in range(n) %}{{ v }}{% endfor %}"},
    )
    with pytest.raises(TemplateRenderError, match=r"bytes; at most 1048576 are sent"):
        rendered("email", "echo", catalog, v="y" * 200_000, n=5)
    fits = rendered("email", "echo", catalog, v="y" * 200_000, n=2)
    assert len(fits.html) + len(fits.text) <= EMAIL_SIZE_LIMIT


def test_markdown_a_telegram_would_reject_is_a_render_error(tmp_path: Path) -> None:
    catalog = extra(tmp_path, {"telegram/sloppy.md.j2": "Price is {{ p }}."})
    with pytest.raises(TemplateRenderError, match="invalid MarkdownV2"):
        rendered("telegram", "sloppy", catalog, p=1)


def test_an_email_text_part_comes_from_its_own_template_when_present(tmp_path: Path) -> None:
    catalog = extra(
        tmp_path,
        {
            "email/note.html.j2": "<title>Note {{ n }}</title><p>HTML {{ n }}</p>",
            "email/note.txt.j2": "Plain {{ n }} <not escaped>",
        },
    )
    email = rendered("email", "note", catalog, n="<1>")
    assert email.text == "Plain <1> <not escaped>\n"
    assert "HTML &lt;1&gt;" in email.html
    assert email.subject == "Note <1>"


def test_an_email_without_a_title_is_a_render_error(tmp_path: Path) -> None:
    catalog = extra(tmp_path, {"email/untitled.html.j2": "<p>{{ n }}</p>"})
    with pytest.raises(TemplateRenderError, match="title"):
        rendered("email", "untitled", catalog, n=1)


def test_the_derived_email_text_keeps_tables_and_links() -> None:
    text = rendered("email", "position_failure_sl").text
    assert "Broker ticket  88123456" in text
    assert f"Close the position now ({BASE_URL}/dashboard/positions)" in text
    assert "display" not in text and "<" not in text


def test_the_optional_currency_is_shown_when_given_and_left_out_otherwise() -> None:
    with_currency = rendered("telegram", "position_failure_tp", currency="JPY").parts[0]
    without = rendered("telegram", "position_failure_tp").parts[0]
    assert "*Profit:* 412\\.8 JPY\n" in with_currency
    assert "*Profit:* 412\\.8\n" in without


def test_prices_keep_every_digit_on_every_channel() -> None:
    for channel in CHANNELS:
        content = str(rendered(channel, "price_alert", trigger_price=1.08345).__dict__)
        assert re.search(r"1\\*\.08345", content)
        assert "1.0835" not in content.replace("1.08345", "")


ACK_URL = "https://api.example.com/ack/v1.AbC-123_x"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_an_alert_carries_its_ack_link_in_every_channel(name: str) -> None:
    def with_link(channel: str) -> Any:
        return render(
            TemplateCatalog(),
            channel,
            name,
            SAMPLES[name],
            message_id=42,
            lane="transactional",
            platform_base_url=BASE_URL,
            ack_url=ACK_URL,
        )

    email = with_link("email")
    assert isinstance(email, RenderedEmail)
    assert f'href="{ACK_URL}"' in email.html
    assert ACK_URL in email.text
    telegram = with_link("telegram")
    assert isinstance(telegram, RenderedTelegram)
    assert f"]({ACK_URL})" in "".join(telegram.parts)
    parse_markdown_v2("".join(telegram.parts))
    push = with_link("push")
    assert isinstance(push, RenderedPush)
    assert push.payload["data"]["url"] == ACK_URL
    assert push.payload["data"]["open_url"].startswith(BASE_URL)


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_producers_ack_url_var_is_dropped_without_a_signed_link(channel: str) -> None:
    """Only the dispatcher signs links: a var of that name renders nothing."""
    forged = rendered(channel, "price_alert", ack_url="https://evil.example/ack/x")
    assert "evil.example" not in str(forged)
    assert "I have seen this" not in str(forged)
