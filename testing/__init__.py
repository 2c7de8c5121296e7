"""outbox.testing: a test kit for outbox and for the services that use it.

In a host service's tests (``pip install 'pg-outbox[testing]'``):

* :func:`assert_enqueued`, :func:`enqueued_messages`, :func:`assert_nothing_enqueued`:
  what a transaction enqueued, read through the caller's own connection, before or
  after its commit (these need only the bare install);
* :func:`drain`, :func:`drain_async`: deliver committed messages in-process through
  the real dispatcher loop and templates, to :class:`RecordingChannel` s, and return
  what each channel would have sent (a :class:`Drained`).

Fake providers on loopback, speaking the real protocols (the test suite's and the
demo's), in submodules that load their libraries only when imported:

* :class:`outbox.testing.smtp.SmtpServer`: a recording SMTP server (aiosmtpd) with
  scripted per-recipient replies, optional AUTH, STARTTLS or implicit TLS.
* :class:`outbox.testing.telegram.TelegramServer`: the Bot API ``sendMessage`` subset
  with a MarkdownV2 parser that rejects what Telegram rejects.
* :class:`outbox.testing.push.PushServer`: a Web Push service that verifies VAPID
  and decrypts ``aes128gcm`` bodies; :class:`outbox.testing.push.VapidKeys`.
* :mod:`outbox.testing.tls`: a throwaway CA for the servers' TLS.

Every server binds 127.0.0.1 on a free port, starts with ``start()`` (or ``with``),
stops with ``stop()`` (closing live connections too, to simulate an outage), and can
be started again on the same port. Pytest fixtures for them:
``pytest_plugins = ["outbox.testing.fixtures"]``. See docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox.testing._enqueued import (
    EnqueuedMessage,
    assert_enqueued,
    assert_nothing_enqueued,
    enqueued_messages,
)

if TYPE_CHECKING:
    from outbox.testing._drain import Drained, RecordingChannel, drain, drain_async

__all__ = [
    "Drained",
    "EnqueuedMessage",
    "RecordingChannel",
    "assert_enqueued",
    "assert_nothing_enqueued",
    "drain",
    "drain_async",
    "enqueued_messages",
]

_DRAIN = {"Drained", "RecordingChannel", "drain", "drain_async"}


def __getattr__(name: str) -> Any:
    # the drain runs the dispatcher: loaded on first use, so that the assertions
    # work with the bare (producer) install
    if name in _DRAIN:
        from outbox.testing import _drain

        return getattr(_drain, name)
    raise AttributeError(f"module 'outbox.testing' has no attribute {name!r}")
