"""The HTTP API: the owner's test sends and message status, the users' own routes
(inbox and its stream, preferences, push subscriptions), ``/health`` and ``/metrics``
(Litestar).

Serve it with ``outbox api``; embed it with ``create_app(Settings.from_env())`` (and
call ``end_streams(app)`` in its event loop when shutting down, or the server waits
for the open inbox streams).

Litestar is imported on first use of :func:`create_app`, not with this package:
every ``outbox`` command loads ``outbox.api.cli`` to register ``outbox api``, and none
but that one should pay for importing a web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.api._app import create_app
    from outbox.api._server import end_streams

__all__ = ["create_app", "end_streams"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from outbox.api._app import create_app

        return create_app
    if name == "end_streams":
        from outbox.api._server import end_streams

        return end_streams
    raise AttributeError(f"module 'api' has no attribute {name!r}")
