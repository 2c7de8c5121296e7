"""Channel ``inapp``: the user's inbox in the platform's own UI.

Delivery is a row: the item is written with the acknowledgement, in the same
transaction (a ``WriteInboxItem`` effect), so it exists exactly when the message
counts as sent, and the API's streams hear of it at that commit (NOTIFY
``outbox_inbox``). There is no provider to fail and no address to lack: the
channel is always reachable, which makes it the natural last link of a fallback
chain. It is not in the default order; a message or a user puts it there.
"""

from __future__ import annotations

from outbox._settings import Settings
from outbox.dispatcher.channels.base import (
    Envelope,
    Outcome,
    PermanentFailure,
    RenderedInApp,
    Sent,
    WriteInboxItem,
)


class InAppChannel:
    """Writes inbox items; needs no configuration."""

    name = "inapp"

    def __init__(self, settings: Settings | None = None) -> None:
        del settings  # nothing to configure: the inbox lives in the outbox database

    async def send(self, envelope: Envelope) -> Outcome:
        """Hand the item to the acknowledgement, which writes it."""
        if not isinstance(envelope.content, RenderedInApp):
            return PermanentFailure(
                error_class="content",
                error=f"inapp got {type(envelope.content).__name__}, not an inbox item",
            )
        item = WriteInboxItem(
            message_id=envelope.message_id, template=envelope.template, item=envelope.content
        )
        return Sent(effects=(item,))

    async def aclose(self) -> None:
        """Nothing to close."""
