"""The owner's HTTP API: test sends, ``/health`` and ``/metrics`` (Litestar).

Serve it with ``outbox api``; embed it with ``create_app(Settings.from_env())``.
"""

from api._app import create_app

__all__ = ["create_app"]
