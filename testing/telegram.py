"""The Telegram Bot API ``sendMessage`` subset on loopback, strict about MarkdownV2.

::

    with TelegramServer(token="123:abc") as telegram:
        telegram.rate_limit(chat_id=42, retry_after=2, times=1)
        telegram.block(7)                 # 403 bot was blocked by the user
        telegram.migrate(-100, to=-1001)  # 400 with migrate_to_chat_id
        ...  # settings: telegram.settings_overrides()
        [message] = telegram.messages
        message.plain_text, message.entities

Answers follow the real API: ``{"ok": false, "error_code": ..., "description": ...,
"parameters": {...}}``. The token in ``/bot<token>/<method>`` must match (else 401);
an unknown method is 404. Every ``parse_mode=MarkdownV2`` text goes through
:func:`outbox.testing.markdown_v2.parse_markdown_v2` and an invalid one is answered
``400 Bad Request: can't parse entities: ...``. Texts over 4096 characters (UTF-16
units, after parsing) are refused like Telegram does.

Every request is recorded with its arrival time (:attr:`requests`) so tests can
check rate limits with :meth:`max_per_second`; optional ``rate_limit_per_second`` and
``chat_rate_limit_per_second`` make the server itself answer 429 like Telegram.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from outbox.testing.http_server import HttpRequest, HttpResponse, LoopbackHttpServer
from outbox.testing.markdown_v2 import MAX_TEXT_LENGTH, Entity, MarkdownV2Error, parse_markdown_v2

ChatId = int | str
_PATH = re.compile(r"^/bot(?P<token>[^/]*)/(?P<method>[A-Za-z]+)$")


@dataclass(frozen=True)
class TelegramRequest:
    """Any ``sendMessage`` call, accepted or not."""

    chat_id: ChatId | None
    text: str | None
    parse_mode: str | None
    status: int
    received_at: float
    """``time.monotonic()`` on arrival."""


@dataclass(frozen=True)
class TelegramMessage:
    """A message the server accepted."""

    message_id: int
    chat_id: ChatId
    text: str
    """The text as sent (MarkdownV2 source)."""
    parse_mode: str | None
    plain_text: str
    """What the user would read: entities applied, escapes removed."""
    entities: tuple[Entity, ...]
    received_at: float


@dataclass
class _Rule:
    kind: Literal["rate_limit", "block", "not_found", "migrate", "fail", "delay"]
    remaining: int | None
    value: float = 0.0
    text: str = ""
    after: int = 0
    """Requests to answer normally before this rule applies."""


def _error(status: int, description: str, **parameters: Any) -> HttpResponse:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return HttpResponse.json(status, body)


def _chat_key(chat_id: ChatId) -> str:
    return str(chat_id)


class TelegramServer(LoopbackHttpServer):
    """A scriptable Bot API server for one bot token."""

    def __init__(
        self,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        rate_limit_per_second: int | None = None,
        chat_rate_limit_per_second: int | None = None,
        on_message: Callable[[TelegramMessage], None] | None = None,
    ) -> None:
        """``on_message`` is called (on a request thread) with every accepted message."""
        super().__init__(host=host, port=port, tls=tls)
        self.on_message = on_message
        self.token = token
        self.rate_limit_per_second = rate_limit_per_second
        self.chat_rate_limit_per_second = chat_rate_limit_per_second
        self._lock = threading.Condition()
        self._requests: list[TelegramRequest] = []
        self._messages: list[TelegramMessage] = []
        self._rules: dict[str, list[_Rule]] = {}
        self._next_id = 1

    # --- scripting -------------------------------------------------------------------

    def _add(self, chat_id: ChatId, rule: _Rule) -> None:
        with self._lock:
            self._rules.setdefault(_chat_key(chat_id), []).append(rule)

    def rate_limit(
        self, chat_id: ChatId, retry_after: int, *, times: int | None = 1, after: int = 0
    ) -> None:
        """Answer 429 ``Too Many Requests: retry after N`` with ``parameters.retry_after``.

        ``after`` requests for this chat are answered normally first.
        """
        self._add(chat_id, _Rule("rate_limit", times, value=retry_after, after=after))

    def block(
        self, chat_id: ChatId, description: str = "Forbidden: bot was blocked by the user"
    ) -> None:
        """Answer 403 from now on (the user blocked the bot)."""
        self._add(chat_id, _Rule("block", None, text=description))

    def chat_not_found(self, chat_id: ChatId) -> None:
        """Answer 400 ``Bad Request: chat not found`` from now on."""
        self._add(chat_id, _Rule("not_found", None))

    def migrate(self, chat_id: ChatId, *, to: int) -> None:
        """Answer 400 with ``parameters.migrate_to_chat_id = to`` from now on."""
        self._add(chat_id, _Rule("migrate", None, value=to))

    def fail(
        self, chat_id: ChatId, status: int = 500, *, times: int | None = 1, after: int = 0
    ) -> None:
        """Answer ``status`` (a 5xx by default) ``times`` times, after ``after`` normal ones."""
        self._add(chat_id, _Rule("fail", times, value=status, after=after))

    def delay(self, chat_id: ChatId, seconds: float, *, times: int | None = 1) -> None:
        """Sleep ``seconds`` before answering (to exercise client timeouts)."""
        self._add(chat_id, _Rule("delay", times, value=seconds))

    def clear(self) -> None:
        """Forget requests, messages and scripted answers."""
        with self._lock:
            self._requests.clear()
            self._messages.clear()
            self._rules.clear()

    # --- inspection ------------------------------------------------------------------

    @property
    def requests(self) -> list[TelegramRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[TelegramMessage]:
        with self._lock:
            return list(self._messages)

    def messages_for(self, chat_id: ChatId) -> list[TelegramMessage]:
        key = _chat_key(chat_id)
        return [m for m in self.messages if _chat_key(m.chat_id) == key]

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[TelegramMessage]:
        """Block until at least ``count`` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {count} messages, got {len(self._messages)}")
                self._lock.wait(left)
            return list(self._messages)

    def max_per_second(
        self, chat_id: ChatId | None = None, *, window: float = 1.0, accepted_only: bool = False
    ) -> int:
        """The most requests that arrived within any ``window`` seconds."""
        key = None if chat_id is None else _chat_key(chat_id)
        times = sorted(
            r.received_at
            for r in self.requests
            if (key is None or _chat_key(r.chat_id or "") == key)
            and (not accepted_only or r.status == 200)
        )
        best, start = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def settings_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``outbox.Settings`` that point at this server."""
        from outbox._settings import Secret

        return {"telegram_bot_token": Secret(self.token), "telegram_api_url": self.url}

    # --- the API -----------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        match = _PATH.match(request.path)
        if match is None:
            return _error(404, "Not Found")
        if match["token"] != self.token:
            return _error(401, "Unauthorized")
        if match["method"] != "sendMessage":
            return _error(404, "Not Found: method not found")
        params = self._params(request)
        if params is None:
            return _error(400, "Bad Request: can't parse JSON object")
        chat_id = params.get("chat_id")
        if isinstance(chat_id, str) and re.fullmatch(r"-?\d+", chat_id):
            chat_id = int(chat_id)
        text = params.get("text")
        parse_mode = params.get("parse_mode") or None
        response = self._send_message(chat_id, text, parse_mode, request.received_at)
        with self._lock:
            self._requests.append(
                TelegramRequest(chat_id, text, parse_mode, response.status, request.received_at)
            )
        return response

    @staticmethod
    def _params(request: HttpRequest) -> dict[str, Any] | None:
        params: dict[str, Any] = {k: v[-1] for k, v in request.query.items()}
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == "application/json":
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                return None
            if not isinstance(body, dict):
                return None
            params.update(body)
        elif content_type == "application/x-www-form-urlencoded":
            params.update({k: v[-1] for k, v in parse_qs(request.body.decode()).items()})
        return params

    def _scripted(self, chat_id: ChatId) -> HttpResponse | None:
        with self._lock:
            rules = self._rules.get(_chat_key(chat_id), [])
            rule = rules[0] if rules else None
            if rule is not None and rule.after > 0:
                rule.after -= 1
                return None
            if rule is not None and rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    rules.remove(rule)
        if rule is None:
            return None
        if rule.kind == "delay":
            time.sleep(rule.value)
            return self._scripted(chat_id)
        if rule.kind == "rate_limit":
            seconds = int(rule.value)
            return _error(429, f"Too Many Requests: retry after {seconds}", retry_after=seconds)
        if rule.kind == "block":
            return _error(403, rule.text)
        if rule.kind == "not_found":
            return _error(400, "Bad Request: chat not found")
        if rule.kind == "migrate":
            return _error(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=int(rule.value),
            )
        status = int(rule.value)
        return _error(status, "Internal Server Error" if status >= 500 else "Bad Request")

    def _over_limit(self, chat_id: ChatId, now: float) -> bool:
        recent = [m for m in self._messages if now - m.received_at < 1.0]
        if self.rate_limit_per_second is not None and len(recent) >= self.rate_limit_per_second:
            return True
        limit = self.chat_rate_limit_per_second
        key = _chat_key(chat_id)
        return limit is not None and sum(_chat_key(m.chat_id) == key for m in recent) >= limit

    def _send_message(
        self, chat_id: ChatId | None, text: Any, parse_mode: str | None, now: float
    ) -> HttpResponse:
        if chat_id is None or chat_id == "":
            return _error(400, "Bad Request: chat_id is empty")
        scripted = self._scripted(chat_id)
        if scripted is not None:
            return scripted
        if not isinstance(text, str) or not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if parse_mode == "MarkdownV2":
            try:
                parsed = parse_markdown_v2(text)
            except MarkdownV2Error as exc:
                return _error(400, f"Bad Request: can't parse entities: {exc}")
            plain, entities = parsed.text, parsed.entities
        elif parse_mode in (None, "HTML", "Markdown"):
            plain, entities = text, ()
        else:
            return _error(400, "Bad Request: unsupported parse_mode")
        if not plain.strip():
            return _error(400, "Bad Request: message text is empty")
        if len(plain.encode("utf-16-le")) // 2 > MAX_TEXT_LENGTH:
            return _error(400, "Bad Request: message is too long")
        with self._lock:
            if self._over_limit(chat_id, now):
                return _error(429, "Too Many Requests: retry after 1", retry_after=1)
            message = TelegramMessage(
                self._next_id, chat_id, text, parse_mode, plain, entities, now
            )
            self._next_id += 1
            self._messages.append(message)
            self._lock.notify_all()
        if self.on_message is not None:
            self.on_message(message)
        return HttpResponse.json(
            200,
            {
                "ok": True,
                "result": {
                    "message_id": message.message_id,
                    "from": {"id": 123456789, "is_bot": True, "first_name": "outbox"},
                    "chat": {"id": chat_id, "type": "private"},
                    "date": int(time.time()),
                    "text": plain,
                },
            },
        )
