"""Exceptions raised by outbox.

::

    OutboxError
     ├── InvalidMessage (also ValueError)   bad arguments to an enqueue call
     │    ├── UnknownTemplate               no such template for that channel
     │    └── MissingTemplateVariables      the template needs variables not given
     ├── ConfigurationError (also ValueError)  bad OUTBOX_* settings
     ├── TemplateRenderError                a stored message could not be rendered
     └── InvalidAckToken                    an acknowledgement link that does not verify

Every error raised by an enqueue call is raised *before* anything is written, so
the caller's transaction stays usable.
"""

from __future__ import annotations

from collections.abc import Iterable


class OutboxError(Exception):
    """Base class of every error raised by outbox."""


class InvalidMessage(OutboxError, ValueError):
    """The arguments of an enqueue call do not describe a valid message."""


class UnknownTemplate(InvalidMessage):
    """No template of that name exists for that channel."""

    def __init__(self, channel: str, template: str, known: Iterable[str] = ()) -> None:
        self.channel = channel
        self.template = template
        known_list = sorted(known)
        hint = f"; known templates: {', '.join(known_list)}" if known_list else ""
        super().__init__(f"unknown template {template!r} for channel {channel!r}{hint}")


class MissingTemplateVariables(InvalidMessage):
    """The template needs variables that the caller did not pass."""

    def __init__(self, channel: str, template: str, missing: Iterable[str]) -> None:
        self.channel = channel
        self.template = template
        self.missing = tuple(sorted(missing))
        super().__init__(
            f"template {template!r} ({channel}) is missing variables: {', '.join(self.missing)}"
        )


class ConfigurationError(OutboxError, ValueError):
    """An OUTBOX_* setting is missing or malformed."""


class TemplateRenderError(OutboxError):
    """A message could not be rendered (a row written through raw SQL, say)."""


class InvalidAckToken(OutboxError):
    """An acknowledgement token is forged, malformed, expired or oversized.

    One message whatever the reason: whoever holds a bad link learns nothing from
    the answer about which part of it failed.
    """

    def __init__(self) -> None:
        super().__init__("invalid or expired acknowledgement link")
