"""uvicorn's server, taught to end the inbox streams when it shuts down.

On SIGTERM uvicorn stops accepting connections and waits for the open responses to
finish before it runs the app's shutdown. An inbox stream never finishes by itself,
so without this the API would wait for its clients forever (or until the process
manager kills it). :class:`ApiServer` ends every stream first (each finishes the
event it is writing; ``EventSource`` clients reconnect elsewhere and resume from
``Last-Event-ID``), then shuts down as uvicorn does. An embedding service that runs
the app in its own server does the same with :func:`end_streams`.
"""

from __future__ import annotations

import signal
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar

from outbox.api._inbox_fanout import InboxFanout


def end_streams(app: Litestar) -> None:
    """End the app's open inbox streams and refuse new ones (call in its event loop)."""
    fanout: InboxFanout | None = app.state.get("inbox_fanout")
    if fanout is not None:
        fanout.end_streams()


class ApiServer(uvicorn.Server):
    """A ``uvicorn.Server`` for the outbox API (``outbox api`` runs one)."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        end_streams(self._app)
        await super().shutdown(sockets)


def serve(app: Litestar, **config: Any) -> bool:
    """Run ``app`` until SIGINT or SIGTERM; False when it did not start (the port
    was taken, say). ``config``: :class:`uvicorn.Config` keywords.
    """
    server = ApiServer(uvicorn.Config(app, **config), app)
    # Once it has shut down gracefully, uvicorn raises the signal that stopped it again
    # under the handler it found, so the process would die of it (exit -15). `outbox api`
    # exits 0 after a graceful stop, as `outbox dispatch` does: the handler it finds
    # (ours) asks the server to stop, which it has done already. A signal that comes
    # before uvicorn installs its own handlers stops the server the same way.

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS} if in_main_thread else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.started


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
