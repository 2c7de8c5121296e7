"""The owner's HTTP API: test sends, ``/health`` and ``/metrics`` (Litestar).

Serve it with ``outbox api``; embed it with ``create_app(Settings.from_env())``.

Litestar is imported on first use of :func:`create_app`, not with this package:
every ``outbox`` command loads ``outbox.api.cli`` to register ``outbox api``, and none
but that one should pay for importing a web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.api._app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from outbox.api._app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
