"""A channel that accepts every message at once (a provider with zero latency).

Loaded by dispatchers through ``OUTBOX_CHANNEL_PLUGINS="push=bench._sink:push"``.
With ``OUTBOX_BENCH_SINK_FILE`` set, each send appends ``<message id> <unix time>``
(the moment the send started) to that file: one short ``O_APPEND`` write, atomic
across processes. Without it, a send does nothing at all.
"""

from __future__ import annotations

import os
import time

from outbox import Settings
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent

_SENT = Sent()


class SinkChannel:
    """Accepts instantly; optionally records when each send started."""

    def __init__(self, name: str) -> None:
        self.name = name
        path = os.environ.get("OUTBOX_BENCH_SINK_FILE")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.count = 0

    async def send(self, envelope: Envelope) -> Outcome:
        self.count += 1
        if self._fd is not None:
            os.write(self._fd, f"{envelope.message_id} {time.time():.6f}\n".encode())
        return _SENT

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def email(settings: Settings) -> SinkChannel:
    return SinkChannel("email")


def telegram(settings: Settings) -> SinkChannel:
    return SinkChannel("telegram")


def push(settings: Settings) -> SinkChannel:
    return SinkChannel("push")
