"""Twilio's Messages API on loopback, with signed status callbacks like the real one.

::

    with TwilioServer(account_sid=ACCOUNT, auth_token=TOKEN, tls=True) as twilio:
        twilio.unsubscribed("+15005550009")        # 400, code 21610
        twilio.answer("+15005550001", status=400, code=21211)
        twilio.undeliverable("+15005550004", error_code=30005)  # accepted, then fails
        ...  # settings: twilio.settings_overrides()
        [message] = twilio.wait_for_messages(1)
        message.body, message.sid
        twilio.wait_for_callbacks(2)               # what our webhook answered

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` checks HTTP basic
authentication (the account SID and auth token; else 401 with code 20003), that
the path names the same account, and the form: ``To`` in E.164 (else code 21211),
``Body`` (else 21602) and exactly one of ``From`` and ``MessagingServiceSid``
(else 21603/21701-like 400s). An accepted message is answered 201 with a Message
resource: ``sid`` ``SM`` + 32 hex digits, ``status`` ``queued``. Errors are
Twilio's shape: ``{"code", "message", "more_info", "status"}``.

When the message asked for a ``StatusCallback``, a background thread posts to it
what Twilio posts: form fields ``MessageSid``, ``MessageStatus`` (``sent``, then
``delivered``; or ``undelivered`` with ``ErrorCode``), ``AccountSid``, ``From``,
``To``, ``ApiVersion``, signed with ``X-Twilio-Signature`` = base64 HMAC-SHA1 of the
callback URL followed by every form field's name and value sorted by name, under
the auth token (:func:`twilio_signature`). The answers our webhook gave are kept in
:attr:`TwilioServer.callbacks`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx

from outbox.testing.http_server import HttpRequest, HttpResponse, LoopbackHttpServer
from outbox.testing.tls import LoopbackCertificate

_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Messages\.json$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
API_VERSION = "2010-04-01"


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """``X-Twilio-Signature`` for a form POST to ``url`` (Twilio's documented scheme)."""
    material = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), material.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class TwilioRequest:
    """Any Messages request, accepted or not."""

    to: str | None
    sender: str | None
    body: str | None
    status_callback: str | None
    status: int
    code: int | None
    received_at: float


@dataclass(frozen=True)
class TwilioMessage:
    """A message the server accepted."""

    sid: str
    to: str
    sender: str
    body: str
    status_callback: str | None
    received_at: float


@dataclass(frozen=True)
class Callback:
    """One status callback posted, and what the webhook answered."""

    message_sid: str
    message_status: str
    error_code: str | None
    status: int
    """The webhook's HTTP status (0 when it could not be reached)."""


@dataclass
class _Script:
    status: int
    code: int | None
    message: str
    remaining: int | None
    retry_after: int | None = None


def _error(
    status: int, code: int | None, message: str, headers: dict[str, str] | None = None
) -> HttpResponse:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}" if code else None,
        "status": status,
    }
    return HttpResponse.json(status, body, headers)


class TwilioServer(LoopbackHttpServer):
    """A scriptable Twilio Messages API for one account."""

    def __init__(
        self,
        *,
        account_sid: str = "AC" + "5e" * 16,
        auth_token: str = "loopback-twilio-auth-token",  # noqa: S107  (a test server)
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        certificate: LoopbackCertificate | None = None,
        callback_delay_seconds: float = 0.05,
        on_message: Callable[[TwilioMessage], None] | None = None,
    ) -> None:
        """``certificate``: serve HTTPS with it (default: the process's loopback one);
        ``on_message`` is called (on a request thread) with every accepted message.
        """
        super().__init__(host=host, port=port, tls=tls, certificate=certificate)
        self.on_message = on_message
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.callback_delay_seconds = callback_delay_seconds
        self._lock = threading.Condition()
        self._requests: list[TwilioRequest] = []
        self._messages: list[TwilioMessage] = []
        self._callbacks: list[Callback] = []
        self._scripts: dict[str, list[_Script]] = {}
        self._undeliverable: dict[str, str] = {}
        self._threads: list[threading.Thread] = []

    # --- scripting ---------------------------------------------------------------------

    def answer(
        self,
        to: str,
        *,
        status: int,
        code: int | None = None,
        message: str = "scripted error",
        times: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer requests for ``to`` with this error (``times`` times; None: always)."""
        with self._lock:
            self._scripts.setdefault(to, []).append(
                _Script(status, code, message, times, retry_after)
            )

    def unsubscribed(self, to: str) -> None:
        """The user replied STOP: 400 with code 21610 from now on."""
        self.answer(to, status=400, code=21610, message="Attempt to send to unsubscribed recipient")

    def invalid_number(self, to: str) -> None:
        """400 with code 21211 from now on."""
        self.answer(
            to, status=400, code=21211, message=f"The 'To' number {to} is not a valid phone number."
        )

    def rate_limit(self, to: str, *, retry_after: int = 1, times: int = 1) -> None:
        """429 with code 20429 and ``Retry-After``."""
        self.answer(
            to,
            status=429,
            code=20429,
            message="Too Many Requests",
            times=times,
            retry_after=retry_after,
        )

    def undeliverable(self, to: str, *, error_code: str = "30005") -> None:
        """Accept messages to ``to``, then report them ``undelivered`` with ``error_code``."""
        with self._lock:
            self._undeliverable[to] = error_code

    # --- inspection ----------------------------------------------------------------------

    @property
    def requests(self) -> list[TwilioRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[TwilioMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def callbacks(self) -> list[Callback]:
        with self._lock:
            return list(self._callbacks)

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[TwilioMessage]:
        """Block until at least ``count`` messages were accepted; return them all."""
        return self._wait(lambda: self._messages, count, timeout, "messages")

    def wait_for_callbacks(self, count: int, timeout: float = 10.0) -> list[Callback]:
        """Block until at least ``count`` status callbacks were answered; return them all."""
        return self._wait(lambda: self._callbacks, count, timeout, "callbacks")

    def _wait(self, items: Any, count: int, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(items()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {count} {what}, got {len(items())}")
                self._lock.wait(left)
            return list(items())

    def settings_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``outbox.Settings`` that point at this server."""
        from outbox._settings import Secret

        return {
            "sms_api_url": self.url,
            "sms_account_sid": self.account_sid,
            "sms_auth_token": Secret(self.auth_token),
            "sms_from": "+15005550006",
        }

    def environment(self) -> dict[str, str]:
        """``OUTBOX_SMS_*`` variables that point a dispatcher subprocess at this server."""
        return {
            "OUTBOX_SMS_API_URL": self.url,
            "OUTBOX_SMS_ACCOUNT_SID": self.account_sid,
            "OUTBOX_SMS_AUTH_TOKEN": self.auth_token,
            "OUTBOX_SMS_FROM": "+15005550006",
        }

    def stop(self) -> None:
        super().stop()
        for thread in list(self._threads):
            thread.join(timeout=10)

    # --- the API -------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        form: dict[str, str] = {}
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == "application/x-www-form-urlencoded":
            parsed = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
            form = {key: values[-1] for key, values in parsed.items()}
        match = _PATH.match(request.path)
        message: TwilioMessage | None = None
        code: int | None
        failure: str | None = None
        if request.method != "POST" or match is None:
            response, code = _error(404, 20404, "The requested resource was not found"), 20404
        elif not self._authorized(request) or match["account"] != self.account_sid:
            response, code = (
                _error(
                    401,
                    20003,
                    "Authentication Error - invalid username",
                    {"WWW-Authenticate": 'Basic realm="Twilio API"'},
                ),
                20003,
            )
        else:
            response, code, message = self._create(form, request.received_at)
        with self._lock:
            # the request is on record before anyone waiting for its message wakes up
            self._requests.append(
                TwilioRequest(
                    form.get("To"),
                    form.get("From") or form.get("MessagingServiceSid"),
                    form.get("Body"),
                    form.get("StatusCallback"),
                    response.status,
                    code,
                    request.received_at,
                )
            )
            if message is not None:
                self._messages.append(message)
                failure = self._undeliverable.get(message.to)
            self._lock.notify_all()
        if message is not None:
            if self.on_message is not None:
                self.on_message(message)
            if message.status_callback:
                thread = threading.Thread(
                    target=self._report,
                    args=(message, failure),
                    name="twilio-callbacks",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        return response

    def _authorized(self, request: HttpRequest) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        given = request.headers.get("Authorization") or ""
        return hmac.compare_digest(given.encode(), f"Basic {expected}".encode())

    def _scripted(self, to: str) -> _Script | None:
        with self._lock:
            scripts = self._scripts.get(to, [])
            if not scripts:
                return None
            script = scripts[0]
            if script.remaining is not None:
                script.remaining -= 1
                if script.remaining <= 0:
                    scripts.remove(script)
            return script

    def _create(
        self, form: dict[str, str], now: float
    ) -> tuple[HttpResponse, int | None, TwilioMessage | None]:
        """Twilio's answer to a Messages request, its error code, and the message
        accepted (None when refused).
        """
        to, body = form.get("To", ""), form.get("Body", "")
        senders = [form[k] for k in ("From", "MessagingServiceSid") if form.get(k)]
        if not _E164.match(to):
            error = f"The 'To' number {to} is not a valid phone number."
            return _error(400, 21211, error), 21211, None
        if len(senders) != 1:
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' is required."), 21603, None
        if not body.strip():
            return _error(400, 21602, "Message body is required."), 21602, None
        if len(body) > 1600:
            error = "The concatenated message body exceeds 1600 characters."
            return _error(400, 21617, error), 21617, None
        script = self._scripted(to)
        if script is not None:
            headers = {"Retry-After": str(script.retry_after)} if script.retry_after else None
            return _error(script.status, script.code, script.message, headers), script.code, None
        message = TwilioMessage(
            sid="SM" + secrets.token_hex(16),
            to=to,
            sender=senders[0],
            body=body,
            status_callback=form.get("StatusCallback") or None,
            received_at=now,
        )
        resource = {
            "sid": message.sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": body,
            "status": "queued",
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": API_VERSION,
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{message.sid}.json",
        }
        return HttpResponse.json(201, resource), None, message

    # --- status callbacks --------------------------------------------------------------

    def _report(self, message: TwilioMessage, failure: str | None) -> None:
        statuses = [("sent", None), ("undelivered", failure) if failure else ("delivered", None)]
        for status, error_code in statuses:
            time.sleep(self.callback_delay_seconds)
            self.post_callback(message, status, error_code=error_code)

    def status_callback_form(
        self, message: TwilioMessage, status: str, *, error_code: str | None = None
    ) -> dict[str, str]:
        """The form Twilio posts for ``message`` reaching ``status``."""
        form = {
            "MessageSid": message.sid,
            "SmsSid": message.sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "AccountSid": self.account_sid,
            "From": message.sender,
            "To": message.to,
            "ApiVersion": API_VERSION,
        }
        if error_code is not None:
            form["ErrorCode"] = error_code
        return form

    def post_callback(
        self, message: TwilioMessage, status: str, *, error_code: str | None = None
    ) -> int:
        """Post one signed status callback to the message's ``StatusCallback``; its status."""
        assert message.status_callback is not None
        form = self.status_callback_form(message, status, error_code=error_code)
        signature = twilio_signature(message.status_callback, form, self.auth_token)
        try:
            with httpx.Client(verify=self.client_tls_context(), timeout=10.0) as client:
                answer = client.post(
                    message.status_callback,
                    data=form,
                    headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
                )
            code = answer.status_code
        except httpx.HTTPError:
            code = 0
        with self._lock:
            self._callbacks.append(Callback(message.sid, status, error_code, code))
            self._lock.notify_all()
        return code
