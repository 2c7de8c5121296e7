"""EmailChannel against a real SMTP server on loopback (no database needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    MarkEmailUndeliverable,
    Outcome,
    PermanentFailure,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.dispatcher.channels.email import EmailChannel
from outbox.testing.envelopes import email_envelope
from outbox.testing.fixtures import SENDER, SMTP_PASSWORD, SMTP_USERNAME
from outbox.testing.smtp import SmtpServer

SmtpFactory = Callable[..., SmtpServer]


def settings_for(server: SmtpServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        **server.settings_overrides(),
        "smtp_from": SENDER,
        "smtp_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def channel_for(server: SmtpServer, **overrides: Any) -> AsyncIterator[EmailChannel]:
    channel = EmailChannel(
        settings_for(server, **overrides), tls_context=server.client_tls_context()
    )
    try:
        yield channel
    finally:
        await channel.aclose()


def assert_no_secret(outcome: Outcome) -> None:
    assert SMTP_PASSWORD not in repr(outcome)


async def test_an_email_arrives_as_multipart_text_and_html_with_a_stable_message_id(
    smtp_server: SmtpServer,
) -> None:
    envelope = email_envelope("trader@example.com", message_id=4711)
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(envelope)

    assert outcome == Sent(provider_id="<outbox-4711@outbox.test>")
    [mail] = smtp_server.messages
    message = mail.message
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == ("trader@example.com",)
    assert message["From"] == SENDER
    assert message["To"] == "trader@example.com"
    assert message["Subject"] == "⚠️ Manual Trade Entry Required - EURUSD"
    assert message["Message-ID"] == "<outbox-4711@outbox.test>"
    assert message["Date"] is not None
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().strip() == "Entry for EURUSD failed."
    assert "<b>EURUSD</b>" in html.get_content()


async def test_a_451_is_transient_and_the_retry_is_delivered(smtp_server: SmtpServer) -> None:
    smtp_server.respond("flaky@example.com", "451 4.3.0 Try again later", times=1)
    envelope = email_envelope("flaky@example.com")
    async with channel_for(smtp_server) as channel:
        first = await channel.send(envelope)
        second = await channel.send(envelope)

    assert isinstance(first, TransientFailure)
    assert first.error_class == "smtp_4xx"
    assert "451" in first.error
    assert isinstance(second, Sent)
    assert [m.rcpt_tos for m in smtp_server.messages] == [("flaky@example.com",)]


async def test_a_550_recipient_is_permanent_and_marks_the_address_undeliverable(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.respond("gone@example.com", "550 5.1.1 No such user")
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(email_envelope("gone@example.com"))
        after = await channel.send(email_envelope("trader@example.com"))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "smtp_5xx"
    assert outcome.effects == (MarkEmailUndeliverable(),)
    assert "550 5.1.1 No such user" in outcome.error
    assert isinstance(after, Sent), "the session stays usable after a refused recipient"
    assert smtp_server.connections == 1


async def test_a_policy_refusal_of_the_recipient_does_not_mark_the_address(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.respond("someone@example.com", "554 5.7.1 Relay access denied")
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(email_envelope("someone@example.com"))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.effects == ()


async def test_a_5xx_after_data_is_permanent_without_marking_the_address(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.respond("trader@example.com", "554 5.6.0 Message rejected", at="DATA")
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(email_envelope("trader@example.com"))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "smtp_5xx"
    assert outcome.effects == ()


@pytest.mark.parametrize("tls", ["none", "starttls", "tls"])
async def test_login_works_in_every_tls_mode(smtp_server_factory: SmtpFactory, tls: str) -> None:
    server = smtp_server_factory(tls=tls, username=SMTP_USERNAME, password=SMTP_PASSWORD)
    async with channel_for(server) as channel:
        outcome = await channel.send(email_envelope())

    assert isinstance(outcome, Sent)
    [mail] = server.messages
    assert mail.login == SMTP_USERNAME
    assert mail.tls is (tls != "none")


async def test_a_wrong_password_is_a_channel_outage_that_never_shows_the_password(
    smtp_server_factory: SmtpFactory,
) -> None:
    server = smtp_server_factory(tls="starttls", username=SMTP_USERNAME, password="the-real-one")
    async with channel_for(server, smtp_password=Secret(SMTP_PASSWORD)) as channel:
        outcome = await channel.send(email_envelope())

    assert isinstance(outcome, ChannelOutage)
    assert outcome.error_class == "smtp_auth"
    assert_no_secret(outcome)
    assert server.messages == []


async def test_a_server_that_requires_auth_is_an_auth_outage_without_credentials(
    smtp_server_factory: SmtpFactory,
) -> None:
    server = smtp_server_factory(username=SMTP_USERNAME, password=SMTP_PASSWORD)
    async with channel_for(server, smtp_username=None, smtp_password=Secret("")) as channel:
        outcome = await channel.send(email_envelope())

    assert isinstance(outcome, ChannelOutage)
    assert outcome.error_class == "smtp_auth"
    assert "530" in outcome.error


async def test_an_untrusted_certificate_is_a_tls_outage(smtp_server_factory: SmtpFactory) -> None:
    server = smtp_server_factory(tls="tls")
    channel = EmailChannel(settings_for(server))  # the default context does not trust it
    try:
        outcome = await channel.send(email_envelope())
    finally:
        await channel.aclose()

    assert isinstance(outcome, ChannelOutage)
    assert outcome.error_class == "smtp_tls"


async def test_starttls_against_a_server_without_it_is_a_tls_outage(
    smtp_server: SmtpServer,
) -> None:
    async with channel_for(smtp_server, smtp_tls="starttls") as channel:
        outcome = await channel.send(email_envelope())

    assert isinstance(outcome, ChannelOutage)
    assert outcome.error_class == "smtp_tls"
    assert smtp_server.messages == []


async def test_a_stopped_server_is_an_outage_and_the_restarted_one_receives_mail(
    smtp_server_factory: SmtpFactory,
) -> None:
    server = smtp_server_factory(username=SMTP_USERNAME, password=SMTP_PASSWORD)
    async with channel_for(server) as channel:
        assert isinstance(await channel.send(email_envelope()), Sent)
        server.stop()
        down = await channel.send(email_envelope())
        server.start()
        up = await channel.send(email_envelope())

    assert isinstance(down, ChannelOutage)
    assert down.error_class == "smtp_connect"
    assert_no_secret(down)
    assert isinstance(up, Sent)
    assert len(server.messages) == 2


async def test_one_session_carries_many_concurrent_sends(smtp_server: SmtpServer) -> None:
    async with channel_for(smtp_server) as channel:
        outcomes = await asyncio.gather(
            *(channel.send(email_envelope(f"user{i}@example.com")) for i in range(10))
        )

    assert all(isinstance(outcome, Sent) for outcome in outcomes)
    assert len(smtp_server.messages) == 10
    assert smtp_server.connections == 1


async def test_a_session_dropped_by_the_server_is_replaced_without_a_failure(
    smtp_server: SmtpServer,
) -> None:
    async with channel_for(smtp_server) as channel:
        assert isinstance(await channel.send(email_envelope()), Sent)
        smtp_server.disconnect_clients()
        outcome = await channel.send(email_envelope())

    assert isinstance(outcome, Sent)
    assert smtp_server.connections == 2
    assert len(smtp_server.messages) == 2


async def test_a_user_without_an_email_is_unreachable_and_nothing_connects(
    smtp_server: SmtpServer,
) -> None:
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(email_envelope(None))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "no_address"
    assert smtp_server.connections == 0


async def test_a_header_injection_attempt_sends_nothing(smtp_server: SmtpServer) -> None:
    async with channel_for(smtp_server) as channel:
        outcome = await channel.send(email_envelope(subject="Alert\r\nBcc: attacker@example.com"))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "header_injection"
    assert smtp_server.connections == 0


async def test_a_server_that_stalls_is_a_timeout_and_the_next_send_uses_a_new_session(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.stall("slow@example.com", 2.0, at="RCPT")
    async with channel_for(smtp_server, smtp_timeout=0.5) as channel:
        stalled = await channel.send(email_envelope("slow@example.com"))
        after = await channel.send(email_envelope("trader@example.com"))

    assert isinstance(stalled, TransientFailure)
    assert stalled.error_class == "smtp_timeout"
    assert isinstance(after, Sent)
    assert smtp_server.connections == 2
