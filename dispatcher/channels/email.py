"""Email over SMTP (aiosmtplib): one reused connection, multipart text and HTML.

:class:`EmailChannel` keeps a single SMTP session open and shares it between
concurrent sends under an :class:`asyncio.Lock` (the default limit is 100 emails a
minute, far below what one session carries). A session the server closed while idle
is replaced before the next send; if the server drops a *reused* session during
``MAIL``/``RCPT`` (or answers ``421``), the message is retried once on a fresh session
within the same call.

What ``send`` answers (it never raises for provider errors):

=============================================  ======================================
recipient has no email address                 ``Unreachable("no_address")``
CR, LF or NUL in Subject, From or To           ``PermanentFailure("header_injection")``
To is not a single valid mailbox               ``Unreachable("invalid_address")``
From not in ``settings.allowed_senders``       ``PermanentFailure("sender_not_allowed")``
cannot connect, greeting refused, timeout      ``ChannelOutage("smtp_connect")``
TLS handshake, certificate or STARTTLS fails   ``ChannelOutage("smtp_tls")``
login refused, no AUTH, ``530``/``535``        ``ChannelOutage("smtp_auth")``
any ``4xx``                                    ``TransientFailure("smtp_4xx")``
``5xx`` on ``RCPT`` for the address            ``PermanentFailure("smtp_5xx")`` with
                                               :class:`MarkEmailUndeliverable`
``5xx`` on ``RCPT`` with status ``5.7.x``      ``PermanentFailure("smtp_5xx")`` (a
                                               policy refusal says nothing about the
                                               address, so it is not marked)
``5xx`` on ``MAIL`` or ``DATA``                ``PermanentFailure("smtp_5xx")``
session dropped or timed out mid-send          ``TransientFailure("smtp_disconnected"
                                               / "smtp_timeout")``
=============================================  ======================================

Every message carries ``Message-ID: <outbox-{message_id}@{From domain}>``, so a
duplicate caused by a lost acknowledgement (or by the single in-call retry above)
can be recognised downstream. The SMTP password is revealed only to ``login`` and is
masked out of every error text.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

import aiosmtplib

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels._redaction import describe_error, redact
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    Envelope,
    MarkEmailUndeliverable,
    Outcome,
    PermanentFailure,
    RenderedEmail,
    Sent,
    TransientFailure,
    Unreachable,
)

logger = logging.getLogger(__name__)

_UNSAFE_HEADER = re.compile(r"[\r\n\x00]")
_AUTH_CODES = frozenset({530, 534, 535, 538})


def has_unsafe_characters(value: str) -> bool:
    """Tell whether a header value contains CR, LF or NUL (header injection)."""
    return _UNSAFE_HEADER.search(value) is not None


def is_single_mailbox(address: str) -> bool:
    """Tell whether ``address`` is one plain ``local@domain`` address and nothing else."""
    if not address or has_unsafe_characters(address) or parseaddr(address)[1] != address:
        return False
    try:
        parsed = Address(addr_spec=address)
    except (ValueError, IndexError, HeaderParseError):
        return False
    return bool(parsed.username) and bool(parsed.domain)


def message_id_for(message_id: int, sender: str) -> str:
    """Return the stable ``Message-ID`` of outbox message ``message_id``."""
    domain = sender.rpartition("@")[2] or "localhost"
    return f"<outbox-{message_id}@{domain}>"


def compose_email(
    envelope: Envelope, content: RenderedEmail, *, from_header: str, sender: str, to: str
) -> EmailMessage:
    """Build the multipart/alternative message (text first, HTML preferred)."""
    message = EmailMessage()
    message["From"] = from_header
    message["To"] = to
    message["Subject"] = content.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = message_id_for(envelope.message_id, sender)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(content.text)
    message.add_alternative(content.html, subtype="html")
    return message


class _Session(aiosmtplib.SMTP):
    """An SMTP client that can wait until its connection is really gone.

    Closing a TLS session is a handshake of its own; a channel that returned before it
    ended would leave the socket to the garbage collector.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.lost = asyncio.Event()
        # Set once connected: quit() forgets the transport before its socket is gone.
        self.opened = False

    def _on_connection_lost(self, protocol: Any) -> None:  # aiosmtplib's hook
        super()._on_connection_lost(protocol)
        self.lost.set()  # a session object connects once, so this is its connection


async def _wait_closed(sessions: set[_Session], *, timeout: float) -> None:
    """Wait (bounded) until every session's socket is closed."""
    waits = [asyncio.ensure_future(session.lost.wait()) for session in sessions]
    if not waits:
        return
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for wait in pending:
        wait.cancel()


class _Outage(Exception):
    def __init__(self, outcome: ChannelOutage) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class EmailChannel:
    """Sends :class:`RenderedEmail` content over one shared SMTP session.

    Raises :class:`~outbox._errors.ConfigurationError` at construction when
    ``settings.smtp_from`` is not a valid address or not in
    ``settings.allowed_senders``. ``tls_context`` overrides the default verifying
    context (tests and the demo pass one that trusts their loopback certificate).
    """

    name: str = "email"

    def __init__(self, settings: Settings, *, tls_context: ssl.SSLContext | None = None) -> None:
        if has_unsafe_characters(settings.smtp_from):
            raise ConfigurationError("OUTBOX_SMTP_FROM contains CR, LF or NUL")
        sender = parseaddr(settings.smtp_from)[1]
        if not is_single_mailbox(sender):
            raise ConfigurationError(f"OUTBOX_SMTP_FROM is not an address: {settings.smtp_from!r}")
        self._allowed = frozenset(parseaddr(a)[1].lower() for a in settings.allowed_senders)
        if sender.lower() not in self._allowed:
            raise ConfigurationError(
                f"OUTBOX_SMTP_FROM {sender!r} is not in OUTBOX_SMTP_ALLOWED_SENDERS"
            )
        self._settings = settings
        self._from_header = settings.smtp_from
        self._sender = sender
        self._tls_context = tls_context
        self._smtp: _Session | None = None
        self._closing: set[_Session] = set()
        self._lock = asyncio.Lock()

    async def send(self, envelope: Envelope) -> Outcome:
        """Deliver one email; see the module docstring for the classification."""
        content = envelope.content
        if not isinstance(content, RenderedEmail):
            return PermanentFailure(
                error_class="wrong_content", error=f"email cannot send {type(content).__name__}"
            )
        to = (envelope.recipient.email or "").strip()
        if not to:
            return Unreachable(error_class="no_address", error="the user has no email address")
        for header, value in (
            ("Subject", content.subject),
            ("To", to),
            ("From", self._from_header),
        ):
            if has_unsafe_characters(value):
                return PermanentFailure(
                    error_class="header_injection",
                    error=f"{header} contains CR, LF or NUL; refused to send",
                )
        if not is_single_mailbox(to):
            return Unreachable(error_class="invalid_address", error="not a valid email address")
        if self._sender.lower() not in self._allowed:
            return PermanentFailure(
                error_class="sender_not_allowed", error=f"From {self._sender} is not allowed"
            )
        try:
            message = compose_email(
                envelope, content, from_header=self._from_header, sender=self._sender, to=to
            )
        except ValueError as exc:  # the email package refuses what it cannot encode
            return PermanentFailure(error_class="invalid_message", error=describe_error(exc))
        async with self._lock:
            try:
                return await self._deliver(message, to)
            except BaseException:
                # Cancelled mid-transaction: the session state is unknown.
                self._discard()
                raise

    async def aclose(self) -> None:
        """Say QUIT and close the shared session, if any."""
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is not None and smtp.is_connected:
                try:
                    await smtp.quit()
                except (aiosmtplib.SMTPException, OSError):
                    pass
                finally:
                    self._close(smtp)
            elif smtp is not None:
                self._close(smtp)
            closing, self._closing = self._closing, set()
            await _wait_closed(closing, timeout=2.0)

    # --- internals -----------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        password = self._settings.smtp_password
        return (password.reveal(),) if password else ()

    def _discard(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            self._close(smtp)

    def _close(self, smtp: _Session) -> None:
        """Close a session; :meth:`aclose` waits until its socket is really closed."""
        self._closing = {s for s in self._closing if not s.lost.is_set()}
        if smtp.transport is not None or (smtp.opened and not smtp.lost.is_set()):
            self._closing.add(smtp)
        smtp.close()

    async def _deliver(self, message: EmailMessage, to: str) -> Outcome:
        message_id = str(message["Message-ID"])
        for attempt in (1, 2):
            try:
                smtp, reused = await self._session()
            except _Outage as outage:
                return outage.outcome
            retry_allowed = reused and attempt == 1
            try:
                await smtp.send_message(message, sender=self._sender, recipients=[to])
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refusal = exc.recipients[0]
                return self._classify(refusal.code, refusal.message, "RCPT TO", recipient=True)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:
                    self._discard()
                    if retry_allowed:
                        continue
                stage = "DATA" if isinstance(exc, aiosmtplib.SMTPDataError) else "MAIL FROM"
                return self._classify(exc.code, exc.message, stage, recipient=False)
            except aiosmtplib.SMTPServerDisconnected as exc:
                self._discard()
                if retry_allowed:
                    logger.info("SMTP session was dropped; sending again on a new one")
                    continue
                return TransientFailure(
                    error_class="smtp_disconnected", error=describe_error(exc, self._secrets())
                )
            except TimeoutError as exc:  # aiosmtplib.SMTPTimeoutError included
                self._discard()
                return TransientFailure(
                    error_class="smtp_timeout", error=describe_error(exc, self._secrets())
                )
            except aiosmtplib.SMTPNotSupported as exc:
                return PermanentFailure(
                    error_class="smtp_not_supported", error=describe_error(exc, self._secrets())
                )
            except ValueError as exc:
                return Unreachable(
                    error_class="invalid_address", error=describe_error(exc, self._secrets())
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                self._discard()
                return TransientFailure(
                    error_class="smtp_error", error=describe_error(exc, self._secrets())
                )
            return Sent(provider_id=message_id)
        raise AssertionError("unreachable: the second attempt always returns")

    def _classify(self, code: int, text: str, stage: str, *, recipient: bool) -> Outcome:
        error = redact(f"{code} {text} (at {stage})", self._secrets())
        if code in _AUTH_CODES:
            return ChannelOutage(error_class="smtp_auth", error=error)
        if 400 <= code < 500:
            return TransientFailure(error_class="smtp_4xx", error=error)
        if recipient and 500 <= code < 600 and not text.lstrip().startswith("5.7."):
            return PermanentFailure(
                error_class="smtp_5xx", error=error, effects=(MarkEmailUndeliverable(),)
            )
        return PermanentFailure(error_class="smtp_5xx", error=error)

    async def _session(self) -> tuple[_Session, bool]:
        """Return the shared session and whether it was reused; raise :class:`_Outage`."""
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp, True
        self._discard()
        settings = self._settings
        mode = settings.smtp_tls
        smtp = _Session(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            timeout=settings.smtp_timeout,
            use_tls=mode == "tls",
            start_tls=False,
            tls_context=self._tls_context if mode != "none" else None,
        )
        try:
            await self._open(smtp)
        except BaseException:
            self._close(smtp)
            raise
        self._smtp = smtp
        return smtp, False

    def _outage(self, error_class: str, error: str) -> _Outage:
        """The whole channel is down (connect, TLS, login): secrets redacted."""
        return _Outage(ChannelOutage(error_class=error_class, error=redact(error, self._secrets())))

    async def _open(self, smtp: _Session) -> None:
        settings = self._settings
        where = f"{settings.smtp_host}:{settings.smtp_port}"
        try:
            await smtp.connect()
            smtp.opened = True
        except (aiosmtplib.SMTPException, OSError) as exc:
            tls_failed = isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError)
            kind = "smtp_tls" if tls_failed else "smtp_connect"
            raise self._outage(kind, f"cannot connect to {where}: {exc}") from exc
        if settings.smtp_tls == "starttls":
            try:
                await smtp.starttls()
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise self._outage("smtp_tls", f"STARTTLS with {where} failed: {exc}") from exc
        if settings.smtp_username:
            try:
                await smtp.login(settings.smtp_username, settings.smtp_password.reveal())
            except aiosmtplib.SMTPServerDisconnected as exc:
                outcome = ChannelOutage(
                    error_class="smtp_connect", error=describe_error(exc, self._secrets())
                )
                raise _Outage(outcome) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise self._outage("smtp_auth", f"login to {where} failed: {exc}") from exc
        logger.info("SMTP session open to %s (tls=%s)", where, settings.smtp_tls)
