"""A recording SMTP server on loopback (aiosmtpd) with scripted replies.

::

    with SmtpServer(tls="starttls", username="bot", password="s3cret") as smtp:
        smtp.respond("flaky@example.com", "451 4.3.0 try again later", times=1)
        smtp.respond("gone@example.com", "550 5.1.1 no such user")
        ...  # send mail to smtp.host:smtp.port (trust smtp.client_tls_context())
        [mail] = smtp.wait_for_messages(1)
        mail.message["Subject"], mail.message.get_body(("html",)).get_content()

The server runs its own event loop in a daemon thread, so it works from synchronous
tests, from async tests on any loop, and from subprocess-based acceptance tests.
``stop()`` closes the listening socket *and* every live session (a client holding a
reused connection sees it drop); ``start()`` again listens on the same port.

With ``username`` set, the server requires AUTH (LOGIN or PLAIN) before ``MAIL`` and
answers ``530`` otherwise. With ``tls="starttls"`` it requires STARTTLS before
anything else; with ``tls="tls"`` the socket speaks TLS from the first byte. Either
way the certificate comes from :mod:`outbox.testing.tls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from outbox.testing import tls as tls_helpers

Stage = Literal["RCPT", "DATA"]


@dataclass(frozen=True)
class ReceivedMail:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    raw: bytes
    login: str | None
    tls: bool
    received_at: float


@dataclass
class _Rule:
    stage: Stage
    address: str
    reply: str
    remaining: int | None
    delay: float = 0.0


class _Handler:
    """aiosmtpd hooks: scripted replies, AUTH enforcement, recording."""

    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._owner.username is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = await self._owner._take_reply("RCPT", [address])
        if scripted is not None:
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = await self._owner._take_reply("DATA", envelope.rcpt_tos)
        if scripted is not None:
            return scripted
        raw = envelope.original_content or b""
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        auth = session.auth_data if session.authenticated else None
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        transport = server.transport
        is_tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        self._owner._record(
            ReceivedMail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                message=parsed,
                raw=raw,
                login=login,
                tls=is_tls,
                received_at=time.time(),
            )
        )
        return "250 2.0.0 Message accepted for delivery"


class SmtpServer:
    """A recording, scriptable SMTP server on 127.0.0.1."""

    def __init__(
        self,
        *,
        tls: Literal["none", "starttls", "tls"] = "none",
        username: str | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_message: Callable[[ReceivedMail], None] | None = None,
    ) -> None:
        """``on_message`` is called (on the server's thread) with every accepted mail,
        after it is recorded: to write it somewhere, as the demo does.
        """
        self.tls = tls
        self.on_message = on_message
        self.username = username
        self.password = password
        self.host = host
        self.port = port
        self.connections = 0
        """Sessions opened since construction (to check connection reuse)."""
        self.auth_attempts: list[tuple[str, str, bool]] = []
        """``(mechanism, login, succeeded)`` for every AUTH command."""
        self._lock = threading.Lock()
        self._messages: list[ReceivedMail] = []
        self._rules: list[_Rule] = []
        self._sessions: set[SMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._arrived = threading.Condition(self._lock)

    # --- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> SmtpServer:
        """Listen (on the same port as before when restarted); return self."""
        if self._thread is not None:
            raise RuntimeError("the SMTP server is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._run, args=(loop, ready, failure), name="smtp-server", daemon=True
        )
        self._loop = loop
        thread.start()
        if not ready.wait(10):
            raise TimeoutError("the SMTP server did not start within 10 s")
        if failure:
            thread.join()
            self._loop = None
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close the listener and every live session, then end the server thread."""
        if self._thread is None or self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(timeout=10)
        self._thread.join(timeout=10)
        self._thread = self._loop = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def disconnect_clients(self) -> None:
        """Drop every live session but keep listening (an idle timeout, a restart)."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close_sessions(), self._loop).result(timeout=10)

    # --- scripting and inspection ------------------------------------------------

    def respond(
        self, address: str, reply: str, *, at: Stage = "RCPT", times: int | None = None
    ) -> None:
        """Answer ``reply`` (e.g. ``"451 4.3.0 later"``) for ``address`` at a stage.

        ``at="RCPT"`` answers the ``RCPT TO`` of that address; ``at="DATA"`` answers
        the end of ``DATA`` of a message addressed to it. ``times=None`` means forever;
        rules are consulted in the order they were added.
        """
        with self._lock:
            self._rules.append(_Rule(at, address.lower(), reply, times))

    def stall(
        self, address: str, seconds: float, *, at: Stage = "DATA", times: int | None = 1
    ) -> None:
        """Wait ``seconds`` before answering normally (to exercise client timeouts)."""
        with self._lock:
            self._rules.append(_Rule(at, address.lower(), "", times, delay=seconds))

    def clear(self) -> None:
        """Forget received messages, scripted replies and counters."""
        with self._lock:
            self._messages.clear()
            self._rules.clear()
            self.auth_attempts.clear()
            self.connections = 0

    @property
    def messages(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._messages)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMail]:
        """Block until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"expected {count} messages, got {len(self._messages)} in {timeout} s"
                    )
                self._arrived.wait(left)
            return list(self._messages)

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this server's certificate."""
        return tls_helpers.client_context()

    def settings_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``outbox.Settings`` that point at this server."""
        from outbox._settings import Secret

        overrides: dict[str, Any] = {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_tls": self.tls,
        }
        if self.username is not None:
            overrides["smtp_username"] = self.username
            overrides["smtp_password"] = Secret(self.password or "")
        return overrides

    # --- internals -----------------------------------------------------------------

    async def _take_reply(self, stage: Stage, addresses: list[str]) -> str | None:
        wanted = {address.lower() for address in addresses}
        with self._lock:
            chosen = next(
                (r for r in self._rules if r.stage == stage and r.address in wanted), None
            )
            if chosen is not None and chosen.remaining is not None:
                chosen.remaining -= 1
                if chosen.remaining <= 0:
                    self._rules.remove(chosen)
        if chosen is None:
            return None
        if chosen.delay:
            await asyncio.sleep(chosen.delay)
        return chosen.reply or None

    def _record(self, mail: ReceivedMail) -> None:
        with self._arrived:
            self._messages.append(mail)
            self._arrived.notify_all()
        if self.on_message is not None:
            self.on_message(mail)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        ok = (
            self.username is not None
            and login == self.username
            and password == (self.password or "")
        )
        with self._lock:
            self.auth_attempts.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def _factory(self) -> SMTP:
        starttls = self.tls == "starttls"
        session = SMTP(
            _Handler(self),
            hostname="outbox-test-smtp",
            enable_SMTPUTF8=True,
            tls_context=tls_helpers.server_context() if starttls else None,
            require_starttls=starttls,
            auth_require_tls=False,  # AUTH enforcement happens in handle_MAIL
            authenticator=self._authenticate,
            loop=self._loop,
        )
        with self._lock:
            self.connections += 1
            self._sessions.add(session)
        return session

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        asyncio.set_event_loop(loop)
        implicit = tls_helpers.server_context() if self.tls == "tls" else None
        try:
            server = loop.run_until_complete(
                loop.create_server(self._factory, self.host, self.port, ssl=implicit)
            )
        except BaseException as exc:
            failure.append(exc)
            loop.close()
            ready.set()
            return
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _close_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
            self._sessions.clear()
        tasks = []
        for session in sessions:
            # Abort rather than close: closing a TLS session waits for the peer's
            # close_notify, the loop may stop first, and the socket would be left to
            # the garbage collector (a ResourceWarning). After STARTTLS the socket's
            # own transport sits under the TLS one.
            for transport in (session.transport, getattr(session, "_original_transport", None)):
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
            task = getattr(session, "_handler_coroutine", None)
            if task is not None:
                task.cancel()
                tasks.append(task)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _ in range(3):  # aborted transports close their sockets on the next turns
            await asyncio.sleep(0)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_sessions()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        for task in others:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)


@contextlib.contextmanager
def running_smtp_server(**options: Any) -> Iterator[SmtpServer]:
    """Context manager form of ``SmtpServer(**options).start()``."""
    server = SmtpServer(**options).start()
    try:
        yield server
    finally:
        server.stop()
