"""EmailChannel without a server: message shape, header injection, sender allowlist."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import Any

import pytest

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels._redaction import MASK, describe_error, redact
from outbox.dispatcher.channels.base import PermanentFailure, RenderedTelegram, Unreachable
from outbox.dispatcher.channels.email import (
    EmailChannel,
    compose_email,
    is_single_mailbox,
    message_id_for,
)
from outbox.testing.envelopes import email_envelope, telegram_envelope

# Port 9 (discard) on loopback: if the channel ever tried to connect, the outcome
# would be a ChannelOutage instead of the answer a test expects.
UNUSED = {"smtp_host": "127.0.0.1", "smtp_port": 9, "smtp_timeout": 1.0}


def channel(**overrides: Any) -> EmailChannel:
    values: dict[str, Any] = {**UNUSED, "smtp_from": "alerts@outbox.test"}
    values.update(overrides)
    return EmailChannel(Settings(**values))


def test_the_message_is_multipart_alternative_with_stable_headers() -> None:
    envelope = email_envelope("trader@example.com", message_id=42)
    content = envelope.content
    assert not isinstance(content, RenderedTelegram)
    message = compose_email(
        envelope,
        content,  # type: ignore[arg-type]
        from_header="Outbox Alerts <alerts@outbox.test>",
        sender="alerts@outbox.test",
        to="trader@example.com",
    )
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes())

    assert parsed.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in parsed.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert parsed["Message-ID"] == "<outbox-42@outbox.test>"
    assert parsed["Subject"] == "⚠️ Manual Trade Entry Required - EURUSD"
    assert parsed["From"] == "Outbox Alerts <alerts@outbox.test>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"].datetime.tzinfo is not None


def test_the_message_id_depends_only_on_the_message_and_the_sender_domain() -> None:
    assert message_id_for(7, "alerts@outbox.test") == message_id_for(7, "ops@outbox.test")
    assert message_id_for(7, "alerts@outbox.test") != message_id_for(8, "alerts@outbox.test")


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00"])
@pytest.mark.parametrize("field", ["subject", "to"])
async def test_cr_lf_or_nul_in_a_header_is_refused_before_connecting(field: str, bad: str) -> None:
    if field == "subject":
        envelope = email_envelope(subject=f"Alert{bad}Bcc: attacker@example.com")
    else:
        envelope = email_envelope(f"trader@example.com{bad}Bcc: attacker@example.com")

    outcome = await channel().send(envelope)

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "header_injection"


@pytest.mark.parametrize(
    "address", ["not-an-address", "a@", "@example.com", "a@b.com, c@d.com", "Name <a@b.com>"]
)
async def test_an_invalid_address_is_unreachable(address: str) -> None:
    outcome = await channel().send(email_envelope(address))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "invalid_address"


@pytest.mark.parametrize("address", [None, "", "   "])
async def test_a_missing_address_is_unreachable(address: str | None) -> None:
    outcome = await channel().send(email_envelope(address))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "no_address"


async def test_content_for_another_channel_is_a_permanent_failure() -> None:
    outcome = await channel().send(telegram_envelope())

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "wrong_content"


def test_a_from_outside_the_allowed_senders_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="ALLOWED_SENDERS"):
        channel(smtp_from="ceo@bank.example", smtp_allowed_senders=("alerts@outbox.test",))


def test_a_from_with_a_line_break_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigurationError):
        channel(smtp_from="alerts@outbox.test\r\nBcc: x@example.com")


def test_a_from_with_a_display_name_is_allowed_by_its_address() -> None:
    channel(
        smtp_from="Outbox Alerts <Alerts@Outbox.test>",
        smtp_allowed_senders=("alerts@outbox.test",),
    )


@pytest.mark.parametrize(
    ("address", "valid"),
    [
        ("trader@example.com", True),
        ("first.last+tag@sub.example.co.uk", True),
        ("root@localhost", True),
        ("trader@example.com\n", False),
        ("<trader@example.com>", False),
        ("trader", False),
    ],
)
def test_single_mailbox_detection(address: str, valid: bool) -> None:
    assert is_single_mailbox(address) is valid


def test_redaction_masks_plain_and_percent_encoded_secrets_and_bounds_length() -> None:
    secret = "123:ABC/def+ghi"
    text = f"url /bot{secret}/x and /bot123%3AABC%2Fdef%2Bghi/y " + "z" * 1000

    cleaned = redact(text, [secret])

    assert secret not in cleaned
    assert "123%3AABC%2Fdef%2Bghi" not in cleaned
    assert cleaned.count(MASK) == 2
    assert len(cleaned) == 500


def test_an_exception_is_described_by_type_and_message_without_secrets() -> None:
    assert describe_error(OSError("login hunter22 refused"), ["hunter22"]) == (
        f"OSError: login {MASK} refused"
    )
