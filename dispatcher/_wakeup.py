"""Wake idle dispatchers with LISTEN/NOTIFY, without taxing producers' commits.

A dispatcher with nothing to do registers in ``outbox.sleeper``; ``outbox.enqueue``
sends a NOTIFY only while that table has a row, so under load (nobody asleep)
producers never take NOTIFY's commit-time lock. The order that makes a missed
wakeup impossible is: LISTEN first (the listener is always listening), register
as asleep, claim once more, then wait. A message committed before registration
is found by that last claim; one committed after it sends a NOTIFY.

The listener connection is checked while idle and re-established when it fails;
:meth:`Wakeup.wait` returns at once after a reconnect so that the caller polls,
and the fallback poll interval bounds the latency of any wakeup lost anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg

log = logging.getLogger("outbox.dispatcher")

CHANNEL = "outbox_wakeup"


class Wakeup:
    """A dedicated LISTEN connection that survives being killed."""

    def __init__(
        self,
        conninfo: str,
        *,
        connect_kwargs: dict[str, Any] | None = None,
        health_check_interval: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs or {}
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._health_check_interval = health_check_interval
        self._last_check = 0.0
        self._failures = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether the listener connection is open (as far as we know)."""
        return self._conn is not None and not self._conn.closed

    async def connect(self) -> bool:
        """Open the connection and LISTEN; return False (and log) if that fails."""
        await self.close()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                application_name="outbox-listener",
                **self._connect_kwargs,
            )
            await conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as error:
            self._failures += 1
            log.warning(
                "listener connect failed attempt=%d error=%s", self._failures, type(error).__name__
            )
            return False
        self._conn = conn
        self._failures = 0
        self._last_check = time.monotonic()
        return True

    async def close(self) -> None:
        """Close the listener connection."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):  # already broken
                await conn.close()

    async def drain(self) -> None:
        """Discard notifications that arrived while we were busy."""
        if self._conn is None:
            return
        try:
            async for _ in self._conn.notifies(timeout=0):
                pass
        except psycopg.Error:
            await self._lost()

    async def wait(self, timeout: float) -> str:
        """Wait for a NOTIFY or ``timeout``; returns ``notified``, ``timeout`` or
        ``reconnected`` (the caller must poll: a wakeup may have been lost).
        """
        if not self.connected:
            backoff = min(0.1 * 2**self._failures, 5.0)
            await asyncio.sleep(min(backoff, timeout))
            if await self.connect():
                self.reconnects += 1
                log.info("listener reconnected reconnects=%d", self.reconnects)
                return "reconnected"
            return "timeout"
        assert self._conn is not None
        try:
            async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                return "notified"
            if time.monotonic() - self._last_check >= self._health_check_interval:
                self._last_check = time.monotonic()
                await asyncio.wait_for(self._conn.execute("SELECT 1"), timeout=5)
        except (psycopg.Error, TimeoutError, OSError) as error:
            log.warning("listener lost error=%s", type(error).__name__)
            await self._lost()
            return "timeout"
        return "timeout"

    async def _lost(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, TimeoutError, OSError):
                await asyncio.wait_for(conn.close(), timeout=1)
