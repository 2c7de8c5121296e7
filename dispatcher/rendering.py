"""Render a stored message into what its channel sends.

:func:`render` is a pure function of the catalog, the template and its variables
(plus the renderer's own context: ``message_id``, ``lane``, ``platform_base_url``).
So a failure repeats on every retry: every failure raises
:class:`~outbox.TemplateRenderError`, which the dispatcher records as permanent
(dead, error class ``template``). Messages written through ``outbox.enqueue`` were
validated already; this is the safety net for rows written with raw SQL.

Per channel:

- email: the HTML template with HTML autoescaping; the subject is its ``<title>``;
  the text part is ``email/<name>.txt.j2`` when present, else derived from the HTML.
- telegram: MarkdownV2 where every variable is escaped (:mod:`outbox.dispatcher.markdown`);
  the text must parse, and is split into parts of at most 4096 characters.
- push: a JSON object (``title``, ``body``, ``icon``, ``badge``, ``data.url``) where
  every variable is escaped for the inside of a JSON string; at most 3993 bytes
  once encoded; its ``Topic`` is derived from the template and key variables.
- inapp: a JSON object (``title``, ``body``, ``url``) escaped like push.
- sms: plain text from ``sms/<name>.txt.j2``, stripped, not empty, in at most
  ``sms_max_segments`` segments (:mod:`outbox.dispatcher.sms_text`;
  :class:`~outbox.dispatcher.channels.base.RenderedSms`).
- any other channel (a plugin's): plain text from ``<channel>/<name>.txt.j2``,
  stripped, not empty, at most :data:`TEXT_OUTPUT_LIMIT` characters
  (:class:`~outbox.dispatcher.channels.base.RenderedText`).

Bounds, so that no message (however it was written) can starve or bloat a
dispatcher: vars over :data:`~outbox.MAX_VARS_BYTES` as received (the claim does
not even send them) or nested deeper than :data:`~outbox.MAX_VARS_DEPTH` are
refused before anything is decoded or rendered; every template's output is
streamed against a per-channel budget (:data:`RENDER_OUTPUT_LIMITS`), so a loop
cannot build a gigabyte before a size check; and vars longer than
:data:`INLINE_VARS_CHARS` are decoded and rendered in a worker thread
(:meth:`RenderCache.render_async`), at most :data:`OFFLOAD_CONCURRENCY` at a time,
so the event loop keeps renewing leases and sending other messages meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Mapping
from json.decoder import WHITESPACE  # type: ignore[attr-defined]
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from outbox import vars_depth_exceeds
from outbox._errors import OutboxError, TemplateRenderError
from outbox._templates import TemplateCatalog
from outbox.dispatcher import markdown
from outbox.dispatcher._environments import Environments, OutputTooLong, environments
from outbox.dispatcher._stored_vars import (
    INLINE_VARS_CHARS,
    TOO_DEEP,
    decode_stored_vars,
    stored_vars,
    stored_vars_problem,
)
from outbox.dispatcher._values import value_builder
from outbox.dispatcher.channels.base import (
    Rendered,
    RenderedEmail,
    RenderedInApp,
    RenderedPush,
    RenderedSms,
    RenderedTelegram,
    RenderedText,
)
from outbox.dispatcher.html_text import extract_title, html_to_text
from outbox.dispatcher.sms_text import count_segments

__all__ = [
    "EMAIL_SIZE_LIMIT",
    "INLINE_VARS_CHARS",
    "OFFLOAD_CONCURRENCY",
    "PUSH_PAYLOAD_LIMIT",
    "RENDER_OUTPUT_LIMITS",
    "TELEGRAM_MAX_PARTS",
    "OutputTooLong",
    "RenderCache",
    "Rendered",
    "decode_stored_vars",
    "push_topic",
    "render",
    "stored_vars",
    "stored_vars_problem",
]

PUSH_PAYLOAD_LIMIT = 3993
"""Bytes of JSON a Web Push message may carry (4096 minus encryption overhead)."""

TELEGRAM_MAX_PARTS = 10
"""Telegram messages one notification may become (40,960 characters). Vars are
capped at 256 KiB, and a template may repeat them; a text longer than this is a
template or producer bug, and sending it would flood the user's chat."""

EMAIL_SIZE_LIMIT = 1024 * 1024
"""Bytes of rendered HTML plus text one email may carry (SMTP servers commonly
refuse 10-25 MB including attachments; a notification is far below this)."""

SMS_TEXT_LIMIT = 1600
"""Characters Twilio accepts in one message body (10 segments of GSM-7)."""

DEFAULT_SMS_MAX_SEGMENTS = 4
"""As ``OUTBOX_SMS_MAX_SEGMENTS``'s default."""

RENDER_OUTPUT_LIMITS = {
    "email": EMAIL_SIZE_LIMIT,
    "telegram": 2 * TELEGRAM_MAX_PARTS * markdown.TELEGRAM_LIMIT,
    "push": 16 * PUSH_PAYLOAD_LIMIT,
    "inapp": 16 * PUSH_PAYLOAD_LIMIT,
    "sms": 16 * SMS_TEXT_LIMIT,
}
"""Characters one template of a channel may produce before rendering stops. Each is
above what the channel's own check (bytes of an email, Telegram parts, push bytes)
could accept, so it only cuts short work whose result would be refused anyway.
What is left is bounded: at worst about 2 s of CPU (the email text derived from
1 MiB of HTML), spent in a worker thread when the vars are long."""

OFFLOAD_CONCURRENCY = 2
"""Worker-thread renders one dispatcher runs at once: bounds the memory of large
vars being decoded and rendered (a few MB each at most)."""

_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_TOPIC_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)
"""What ``json.dumps(..., ensure_ascii=False, sort_keys=True, default=str)`` builds on
every call, built once."""
_decode_json = json.JSONDecoder().raw_decode
_json_space = WHITESPACE.match


# CPython's C encoder for _COMPACT_JSON, made once instead of on every call; no
# circular check: what it encodes was just decoded from JSON text
_c_compact = (
    c_make_encoder(
        None, _COMPACT_JSON.default, encode_basestring, None, ":", ",", False, False, True
    )
    if c_make_encoder is not None
    else None
)


def _compact_json(value: object) -> str:
    """``_COMPACT_JSON.encode(value)`` for a value decoded from JSON."""
    if _c_compact is not None:
        return "".join(_c_compact(value, 0))
    return _COMPACT_JSON.encode(value)


def _decode_document(text: str) -> Any:
    """``json.loads(text)`` for a str, minus its per-call checks (same errors)."""
    document, end = _decode_json(text, _json_space(text, 0).end())
    if _json_space(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return document


TOPIC_KEYS = ("approval_id", "broker_ticket", "instrument")
"""Variables that identify what a push message is about, for its ``Topic``."""


def render(
    catalog: TemplateCatalog,
    channel: str,
    template: str,
    vars: Mapping[str, Any],
    *,
    message_id: int | None,
    lane: str,
    platform_base_url: str,
    ack_url: str | None = None,
    sms_max_segments: int = DEFAULT_SMS_MAX_SEGMENTS,
) -> Rendered:
    """Render ``template`` with ``vars`` for ``channel``.

    ``message_id``, ``lane`` and ``platform_base_url`` are available to templates
    under those names and take precedence over variables of the same name, as
    does the function ``platform_url`` (a variable of that name is dropped). So is
    ``ack_url``, the acknowledgement link of an alert; it is undefined for any other
    message (a producer's var of that name is dropped: only the dispatcher signs
    links).
    Raises :class:`~outbox.TemplateRenderError` for anything that prevents a valid
    message: vars nested deeper than :data:`~outbox.MAX_VARS_DEPTH`, unknown
    template, missing variable, a template error or a sandbox violation, output over
    the channel's budget, MarkdownV2 that would not parse, a push payload too large,
    an SMS longer than ``sms_max_segments`` segments.
    """
    if type(vars) is not dict and not isinstance(vars, Mapping):
        raise TemplateRenderError(f"{template} ({channel}): vars must be a JSON object")
    if vars_depth_exceeds(vars):
        raise TemplateRenderError(f"{template} ({channel}): {TOO_DEEP}")
    context = {
        **vars,
        "message_id": message_id,
        "lane": lane,
        "platform_base_url": platform_base_url,
    }
    # platform_url() is the renderer's too: a var of that name never hides it (a
    # call with a constant path is computed when the template is compiled anyway)
    context.pop("platform_url", None)
    if ack_url is None:
        context.pop("ack_url", None)
    else:
        context["ack_url"] = ack_url
    try:
        catalog.validate(channel, template, vars)
        envs = environments(catalog, platform_base_url)
        if channel == "email":
            return _render_email(catalog, envs, template, context)
        if channel == "telegram":
            return _render_telegram(catalog, envs, template, context)
        if channel == "inapp":
            return _render_inapp(catalog, envs, template, context)
        if channel == "push":
            return _render_push(catalog, envs, template, context)
        if channel == "sms":
            return _render_sms(catalog, envs, template, context, sms_max_segments)
        return _render_text(catalog, envs, channel, template, context)
    except TemplateRenderError:
        raise
    except Exception as error:  # rendering is pure: any failure would repeat
        raise TemplateRenderError(f"{template} ({channel}): {error}") from error


def _render_email(
    catalog: TemplateCatalog, envs: Environments, template: str, context: dict[str, Any]
) -> RenderedEmail:
    files = catalog.files("email", template)
    limit = RENDER_OUTPUT_LIMITS["email"]
    html = envs.render(envs.html, files.main, context, limit=limit).strip() + "\n"
    subject = extract_title(html)
    if not subject:
        raise TemplateRenderError(f"{template} (email): the HTML has no <title> for the subject")
    if files.text is not None:
        text = envs.render(envs.text, files.text, context, limit=limit).strip() + "\n"
    else:
        text = html_to_text(html)
    # UTF-8 takes at most 4 bytes a character: only a long text needs encoding to measure
    if (len(html) + len(text)) * 4 > EMAIL_SIZE_LIMIT and (
        size := len(html.encode("utf-8")) + len(text.encode("utf-8"))
    ) > EMAIL_SIZE_LIMIT:
        raise TemplateRenderError(
            f"{template} (email): the HTML and text are {size} bytes; at most"
            f" {EMAIL_SIZE_LIMIT} are sent (shorten the variables or the template)"
        )
    return RenderedEmail(subject=subject, html=html, text=text)


def _render_telegram(
    catalog: TemplateCatalog, envs: Environments, template: str, context: dict[str, Any]
) -> RenderedTelegram:
    text = envs.render(
        envs.telegram,
        catalog.files("telegram", template).main,
        context,
        limit=RENDER_OUTPUT_LIMITS["telegram"],
    )
    if not text.strip():
        raise TemplateRenderError(f"{template} (telegram): the text is empty")
    try:
        parts = markdown.split(text)
    except markdown.MarkdownV2Error as error:
        raise TemplateRenderError(f"{template} (telegram): invalid MarkdownV2: {error}") from error
    if len(parts) > TELEGRAM_MAX_PARTS:
        raise TemplateRenderError(
            f"{template} (telegram): the text needs {len(parts)} messages; at most"
            f" {TELEGRAM_MAX_PARTS} are sent (shorten the variables or the template)"
        )
    return RenderedTelegram(parts=parts)


def _render_push(
    catalog: TemplateCatalog, envs: Environments, template: str, context: dict[str, Any]
) -> RenderedPush:
    raw = envs.render(
        envs.push, catalog.files("push", template).main, context, limit=RENDER_OUTPUT_LIMITS["push"]
    )
    try:
        payload = _decode_document(raw)
    except ValueError as error:
        raise TemplateRenderError(
            f"{template} (push): the template is not JSON: {error}"
        ) from error
    problem = _push_problem(payload)
    if problem:
        raise TemplateRenderError(f"{template} (push): {problem}")
    topic = push_topic(template, context)
    if topic is not None and "tag" not in payload and "tag" not in payload["data"]:
        # The browser's tag: a newer alert about the same instrument, ticket or approval
        # replaces the shown notification (outbox-sw.js), as the Topic replaces an
        # undelivered one at the push service. A template's own tag wins.
        payload["data"]["tag"] = topic
    body = _compact_json(payload).encode("utf-8")
    if len(body) > PUSH_PAYLOAD_LIMIT:
        raise TemplateRenderError(
            f"{template} (push): the payload is {len(body)} bytes; Web Push allows at most"
            f" {PUSH_PAYLOAD_LIMIT} (shorten the variables or the template)"
        )
    return _build_push(payload=payload, body=body, topic=topic)


_build_push = value_builder(RenderedPush)  # RenderedPush(...)

INAPP_ITEM_LIMIT = PUSH_PAYLOAD_LIMIT
"""Bytes of an inbox item's JSON: a notification, not a document (the push budget)."""


def _render_inapp(
    catalog: TemplateCatalog, envs: Environments, template: str, context: dict[str, Any]
) -> RenderedInApp:
    raw = envs.render(
        envs.push,  # the same JSON-string escaping as push
        catalog.files("inapp", template).main,
        context,
        limit=RENDER_OUTPUT_LIMITS["inapp"],
    )
    try:
        item = json.loads(raw)
    except ValueError as error:
        raise TemplateRenderError(
            f"{template} (inapp): the template is not JSON: {error}"
        ) from error
    if not isinstance(item, dict):
        raise TemplateRenderError(f"{template} (inapp): the item must be a JSON object")
    title, body, url = item.get("title"), item.get("body"), item.get("url")
    if not isinstance(title, str) or not title.strip():
        raise TemplateRenderError(f"{template} (inapp): the item needs a non-empty 'title'")
    if not isinstance(body, str):
        raise TemplateRenderError(f"{template} (inapp): the item needs a string 'body'")
    if url is not None and not isinstance(url, str):
        raise TemplateRenderError(f"{template} (inapp): 'url' must be a string")
    size = len(_COMPACT_JSON.encode(item).encode("utf-8"))
    if size > INAPP_ITEM_LIMIT:
        raise TemplateRenderError(
            f"{template} (inapp): the item is {size} bytes; at most {INAPP_ITEM_LIMIT}"
        )
    return RenderedInApp(title=title, body=body, url=url or None)


TEXT_OUTPUT_LIMIT = 64 * 1024
"""Characters of plain text a plugin's channel may get from one template: a
notification, not a document (the provider refuses far less)."""


def _render_text(
    catalog: TemplateCatalog, envs: Environments, channel: str, template: str, context: Any
) -> RenderedText:
    text = envs.render(
        envs.text,
        catalog.files(channel, template).main,
        context,
        limit=RENDER_OUTPUT_LIMITS.get(channel, TEXT_OUTPUT_LIMIT),
    ).strip()
    if not text:
        raise TemplateRenderError(f"{template} ({channel}): the text is empty")
    return RenderedText(text=text)


def _render_sms(
    catalog: TemplateCatalog,
    envs: Environments,
    template: str,
    context: Any,
    max_segments: int,
) -> RenderedSms:
    text = _render_text(catalog, envs, "sms", template, context).text
    cost = count_segments(text)
    if cost.segments > max_segments or len(text) > SMS_TEXT_LIMIT:
        raise TemplateRenderError(
            f"{template} (sms): the text needs {cost.segments} segments ({cost.units}"
            f" {cost.encoding} units), more than the {max_segments} allowed"
            " (OUTBOX_SMS_MAX_SEGMENTS)"
        )
    return RenderedSms(text=text, encoding=cost.encoding, segments=cost.segments)


def _push_problem(payload: object) -> str | None:
    """Describe what is wrong with a push payload's shape; None when nothing is."""
    if not isinstance(payload, dict):
        return "the payload must be a JSON object"
    if not isinstance(payload.get("title"), str) or not payload["title"].strip():
        return "the payload needs a non-empty string 'title'"
    if not isinstance(payload.get("body"), str):
        return "the payload needs a string 'body'"
    for key in ("icon", "badge"):
        if key in payload and not isinstance(payload[key], str):
            return f"'{key}' must be a string"
    data = payload.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        return "the payload needs 'data' with a string 'url'"
    return None


def push_topic(template: str, vars: Mapping[str, Any]) -> str | None:
    """Return a stable Web Push ``Topic`` for a message: 32 URL-safe base64 characters.

    Derived from the template name and the :data:`TOPIC_KEYS` variables present,
    so a newer alert about the same approval, ticket or instrument replaces an
    undelivered older one. ``None`` when no key variable is present.
    """
    keys = [[key, vars[key]] for key in TOPIC_KEYS if key in vars]
    if not keys:
        return None
    # alerts about one instrument or ticket share their topic: text keys are remembered
    # (only text: 1, 1.0 and True are equal keys of a dict, not equal JSON)
    memo: tuple[str, ...] = (template,)
    textual = True
    for key, value in keys:
        if type(value) is not str:
            textual = False
            break
        memo += (key, value)
    if textual and (found := _topics.get(memo)) is not None:
        return found
    material = _TOPIC_JSON.encode([template, keys])
    digest = hashlib.sha256(material.encode("utf-8")).digest()
    topic = base64.urlsafe_b64encode(digest[:24]).decode("ascii")
    if textual:
        if len(_topics) >= _TOPICS_KEPT:
            _topics.clear()
        _topics[memo] = topic
    return topic


_TOPICS_KEPT = 4096
_topics: dict[tuple[str, ...], str] = {}
"""Topics of recent (template, key texts); cleared when full."""


RECENT_RENDERS = 256
"""Renders a :class:`RenderCache` keeps before it knows they are asked for again:
the messages of one fan-out are claimed together, well within this many."""


class RenderCache:
    """Renders each distinct message once per dispatcher.

    A campaign, or one alert fanned out to many users, carries the same variables
    for every recipient; rendering is pure, so the result can be shared. The key is
    the channel, the template and ``vars_key`` (the text of the message's jsonb,
    which PostgreSQL writes in one canonical form), plus ``message_id`` and
    ``lane`` when the template reads them. Failures are not cached. A render is
    kept among the last :data:`RECENT_RENDERS` first; asked for again, among
    ``max_entries`` that were: the renders of messages with vars of their own (most
    messages) are let go young, which spares the garbage collector. When full, each
    starts over (cheaper than keeping an LRU order on every hit).
    """

    def __init__(
        self,
        catalog: TemplateCatalog,
        *,
        platform_base_url: str,
        max_entries: int = 2048,
        sms_max_segments: int = DEFAULT_SMS_MAX_SEGMENTS,
    ) -> None:
        self.catalog = catalog
        self.platform_base_url = platform_base_url
        self.sms_max_segments = sms_max_segments
        self.max_entries = max_entries
        self._rendered: dict[tuple[object, ...], Rendered] = {}
        """Renders asked for more than once."""
        self._recent: dict[tuple[object, ...], Rendered] = {}
        """The latest renders asked for once: most vars are a single message's."""
        self._context_used: dict[tuple[str, str], frozenset[str]] = {}
        """(channel, template) -> the renderer's names it reads (see the key)."""
        self._offload = asyncio.Semaphore(OFFLOAD_CONCURRENCY)
        self.hits = 0

    def render(
        self,
        channel: str,
        template: str,
        vars: Mapping[str, Any] | None,
        *,
        vars_key: str | None,
        message_id: int,
        lane: str,
        ack_url: str | None = None,
    ) -> Rendered:
        """:func:`render`, or what it returned for the same message content before.

        ``vars`` None means not decoded yet: ``vars_key`` (the stored text, or None
        when the claim withheld it as too large) is checked and decoded here, and
        the result is not cached (large vars are rare, and their renders large).
        """
        if vars is None:
            problem = stored_vars_problem(vars_key)
            if problem is not None:
                raise TemplateRenderError(f"{template} ({channel}): {problem}")
            assert vars_key is not None
            try:
                vars = decode_stored_vars(vars_key)
            except TemplateRenderError as error:
                raise TemplateRenderError(f"{template} ({channel}): {error}") from None
            vars_key = None
        if vars_key is None or ack_url is not None:  # a link is for one message only
            return self._render(channel, template, vars, message_id, lane, ack_url)
        used = self._context_used.get((channel, template))
        if used is None:
            try:
                used = self.catalog.variables(channel, template).context
            except OutboxError as error:
                raise TemplateRenderError(f"{template} ({channel}): {error}") from error
            self._context_used[channel, template] = used
        key = (
            channel,
            template,
            vars_key,
            message_id if "message_id" in used else None,
            lane if "lane" in used else None,
        )
        found = self._rendered.get(key)
        if found is None and (found := self._recent.pop(key, None)) is not None:
            if len(self._rendered) >= self.max_entries:  # rendered twice: worth keeping
                self._rendered.clear()
            self._rendered[key] = found
        if found is not None:
            self.hits += 1
            return found
        found = self._render(channel, template, vars, message_id, lane, None)
        if len(self._recent) >= RECENT_RENDERS:
            self._recent.clear()
        self._recent[key] = found
        return found

    def _render(
        self,
        channel: str,
        template: str,
        vars: Mapping[str, Any],
        message_id: int,
        lane: str,
        ack_url: str | None,
    ) -> Rendered:
        return render(
            self.catalog,
            channel,
            template,
            vars,
            message_id=message_id,
            lane=lane,
            platform_base_url=self.platform_base_url,
            ack_url=ack_url,
            sms_max_segments=self.sms_max_segments,
        )

    async def render_async(
        self,
        channel: str,
        template: str,
        vars: Mapping[str, Any] | None,
        *,
        vars_key: str | None,
        message_id: int,
        lane: str,
        ack_url: str | None = None,
    ) -> Rendered:
        """:meth:`render` inline for decoded vars; in a worker thread for the rest.

        Undecoded vars are the long ones (see :func:`stored_vars`): their decoding
        and rendering take milliseconds, which the event loop must not spend.
        While a thread renders, the interpreter hands the event loop its turn every
        few milliseconds (``sys.getswitchinterval``), so heartbeats and other
        sends go on.
        """
        if vars is not None:
            return self.render(
                channel,
                template,
                vars,
                vars_key=vars_key,
                message_id=message_id,
                lane=lane,
                ack_url=ack_url,
            )
        problem = stored_vars_problem(vars_key)
        if problem is not None:  # no thread needed to refuse
            raise TemplateRenderError(f"{template} ({channel}): {problem}")
        async with self._offload:
            return await asyncio.to_thread(
                self.render,
                channel,
                template,
                None,
                vars_key=vars_key,
                message_id=message_id,
                lane=lane,
                ack_url=ack_url,
            )
