"""Error texts that are safe to store: secrets removed, length bounded.

Outcome errors end up in ``outbox.attempt`` and ``outbox.message.last_error`` and in
logs, so every channel builds them through :func:`describe_error` or :func:`redact`
with the secrets it knows (bot token, SMTP password, VAPID key). Provider libraries
like to put URLs and arguments into exception texts; this is the last line of
defence, not the only one.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable
from urllib.parse import quote

MAX_ERROR_LENGTH = 500
MASK = "********"


def _variants(secret: str) -> set[str]:
    # A secret may show up as is, percent-encoded (in a URL) or with ":" encoded
    # only (a Telegram token in a path).
    return {secret, quote(secret, safe=""), quote(secret, safe=":"), secret.replace(":", "%3A")}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every secret masked and at most 500 characters long."""
    for secret in secrets:
        if len(secret) < 4:
            # Masking a very short value would mangle ordinary text; such a secret
            # is not worth protecting by substitution anyway.
            continue
        for variant in sorted(_variants(secret), key=len, reverse=True):
            text = text.replace(variant, MASK)
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


def describe_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """``"ExceptionName: message"`` with secrets masked, for an outcome's ``error``."""
    message = str(exc).strip()
    name = type(exc).__name__
    return redact(f"{name}: {message}" if message else name, secrets)


_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/@\s'\"<>]*@)?([^/\s'\"<>?#]*)[^\s'\"<>]*")


def scrub_urls(text: str) -> str:
    """Every URL in ``text`` cut to its scheme and host: credentials (``user:pass@``),
    paths and queries are where tokens travel (a Telegram bot token is a path
    segment; API keys ride in queries), and a channel that raised (a plugin's, say)
    told us no secrets to mask.
    """
    return _URL.sub(lambda m: f"{m.group(1)}{m.group(2)}/…", text)


def describe_raised(exc: BaseException) -> tuple[str, str]:
    """For an exception a channel let escape: ``(error, traceback)``, URLs scrubbed
    and the error bounded, fit for ``outbox.attempt`` and the log respectively.
    """
    error = redact(scrub_urls(f"{type(exc).__name__}: {exc}".strip().rstrip(":")))
    trace = scrub_urls("".join(traceback.format_exception(exc)))
    return error, trace
