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

import socket
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
    server.run()
    return server.started
