"""SMS templates: plain text, counted in segments, refused beyond the configured cap."""

from __future__ import annotations

from typing import Any

import pytest

from outbox import TemplateRenderError
from outbox._templates import TemplateCatalog
from outbox.dispatcher.channels.base import RenderedSms
from outbox.dispatcher.rendering import RenderCache, render

SL_VARS: dict[str, Any] = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "current_price": "1.0790",
    "loss_amount": "600.00",
    "currency": "USD",
    "broker_ticket": "T-1001",
}
BUILT_IN: dict[str, dict[str, Any]] = {
    "position_failure_sl": SL_VARS,
    "position_failure_tp": {**SL_VARS, "profit_amount": "250.00"},
    "position_failure_entry": {
        "instrument": "EURUSD",
        "side": "sell",
        "entry_price": "1.0850",
        "volume": "0.5",
        "error_reason": "insufficient margin",
        "approval_id": "ap-77",
    },
    "price_alert": {
        "instrument": "XAUUSD",
        "trigger_price": "2400",
        "current_price": "2401.5",
        "condition": "above",
    },
}


def _render(template: str, vars: dict[str, Any], **options: Any) -> RenderedSms:
    rendered = render(
        TemplateCatalog(None),
        "sms",
        template,
        vars,
        message_id=7,
        lane="transactional",
        platform_base_url="https://platform.example.com",
        **options,
    )
    assert isinstance(rendered, RenderedSms)
    return rendered


@pytest.mark.parametrize("template", sorted(BUILT_IN))
def test_every_built_in_template_is_gsm7_text_of_at_most_two_segments(template: str) -> None:
    sms = _render(template, BUILT_IN[template])
    assert sms.encoding == "GSM-7"
    assert 1 <= sms.segments <= 2
    assert "{{" not in sms.text and sms.text == sms.text.strip()
    assert BUILT_IN[template]["instrument"] in sms.text


def test_the_stop_loss_text_names_the_position_and_the_link() -> None:
    sms = _render("position_failure_sl", SL_VARS)
    assert sms.text.startswith("URGENT: the stop loss on your BUY EURUSD position")
    assert "loss 600.00 USD. Ticket T-1001." in sms.text
    assert sms.text.endswith("https://platform.example.com/dashboard/positions")


def test_an_ack_link_is_appended_when_the_message_has_one() -> None:
    link = "https://api.example.com/ack/abc"
    sms = _render("position_failure_sl", SL_VARS, ack_url=link)
    assert sms.text.endswith(f"Seen it? {link}")


def test_a_text_over_the_segment_cap_is_a_render_error() -> None:
    long_reason = {**BUILT_IN["position_failure_entry"], "error_reason": "x" * 400}
    assert _render("position_failure_entry", long_reason, sms_max_segments=4).segments == 4
    with pytest.raises(TemplateRenderError, match=r"needs 4 segments .*more than the 3 allowed"):
        _render("position_failure_entry", long_reason, sms_max_segments=3)


def test_one_emoji_in_a_variable_makes_the_text_ucs2_and_counts_against_the_cap() -> None:
    vars = {**SL_VARS, "instrument": "EURUSD 🚨"}
    assert _render("position_failure_sl", vars, sms_max_segments=4).encoding == "UCS-2"
    with pytest.raises(TemplateRenderError, match="OUTBOX_SMS_MAX_SEGMENTS"):
        _render("position_failure_sl", vars, sms_max_segments=1)


def test_the_render_cache_applies_its_cap() -> None:
    cache = RenderCache(
        TemplateCatalog(None), platform_base_url="https://p.example", sms_max_segments=1
    )
    with pytest.raises(TemplateRenderError):
        cache.render(
            "sms",
            "position_failure_sl",
            SL_VARS,
            vars_key='{"k": 1}',
            message_id=1,
            lane="transactional",
        )
